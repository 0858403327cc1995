"""A method for the tests, found through $SSL_TUNE_METHOD_PATH like a researcher's own: TWIST whose device
runs out of memory in one named stage of training (`oom_in`). The training loop holds no hook for it: the
error comes from the method's own forward pass, or from its backbone's in evaluation, as a real one would."""

from typing import Literal

import torch

from trainers.twist import Twist, TwistConfig

MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB (raised by tests/methods/twist_oom.py)"


class TwistOutOfMemoryConfig(TwistConfig):
    name: Literal["twist_oom"] = "twist_oom"  # type: ignore[assignment]
    oom_in: Literal["training step", "evaluation"] = "training step"


def _out_of_memory_in_evaluation(module: torch.nn.Module, args) -> None:
    if not module.training:  # the evaluation extracts features with the backbone in eval mode
        raise torch.OutOfMemoryError(MESSAGE)


class TwistOutOfMemory(Twist):
    name = "twist_oom"
    Config = TwistOutOfMemoryConfig

    def __init__(self, config, backbone, projector, seed: int = 0) -> None:
        super().__init__(config, backbone, projector, seed)
        if config.oom_in == "evaluation":
            self.backbone.register_forward_pre_hook(_out_of_memory_in_evaluation)

    def forward(self, views):
        if self.config.oom_in == "training step":
            raise torch.OutOfMemoryError(MESSAGE)
        return super().forward(views)


METHOD = TwistOutOfMemory
