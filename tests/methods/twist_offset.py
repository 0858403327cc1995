"""A method for the tests, found through $SSL_TUNE_METHOD_PATH like a researcher's own: TWIST whose reported
loss is set by the test, `offset` plus a seed's noise of +-`noise` (+ on odd seeds, - on even ones), so that a
confirmation race over the loss has results the test knows in advance. The training loop holds no hook for it."""

from typing import Literal

from ssl_tune.spec import Searchable
from trainers.base import StepOutput
from trainers.twist import Twist, TwistConfig


class TwistOffsetConfig(TwistConfig):
    name: Literal["twist_offset"] = "twist_offset"  # type: ignore[assignment]
    offset: Searchable[float] = 2.0
    noise: float = 0.1


class TwistOffset(Twist):
    name = "twist_offset"
    Config = TwistOffsetConfig

    def forward(self, views) -> StepOutput:
        out = super().forward(views)
        seed_noise = self.config.noise if self.seed % 2 else -self.config.noise
        # (TWIST's loss times zero keeps its gradients' shapes; the value is the test's)
        return StepOutput(out.loss * 0 + self.config.offset + seed_noise, out.terms)


METHOD = TwistOffset
