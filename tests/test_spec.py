"""Spec validation: every bad input exits 2 with one message naming file, field and what is allowed."""

import subprocess
import sys
import time

import pytest

from ssl_tune.cli import main
from ssl_tune.spec import Choice, LogUniform, SpecError
from ssl_tune.spec.files import load_spec
from tests.conftest import method_names, tiny_spec_dict, write_spec


def test_shipped_twist_spec_is_valid_and_searches_the_entropy_weights_tau_and_lr(twist_spec_path):
    spec = load_spec(twist_spec_path)
    assert set(spec.search_ranges()) == {"method.lam1", "method.lam2", "method.tau", "optimizer.lr"}
    assert isinstance(spec.search_ranges()["method.tau"], LogUniform)
    resolved = spec.resolve()
    assert resolved.is_resolved and resolved.method.lam2 == 1.0


def test_resolve_uses_given_values_defaults_and_centres(tmp_path):
    raw = tiny_spec_dict()
    raw["method"]["tau"] = {"type": "loguniform", "low": 0.25, "high": 4.0}
    raw["optimizer"]["name"] = {"type": "choice", "values": ["sgd", "adamw"]}
    raw["projector"]["output_dim"] = {"type": "int", "low": 8, "high": 64, "step": 8}
    spec = load_spec(write_spec(tmp_path, raw))
    assert isinstance(spec.search_ranges()["optimizer.name"], Choice)
    centre = spec.resolve()
    assert centre.method.tau == pytest.approx(1.0)  # geometric centre
    assert centre.optimizer.name == "sgd" and centre.projector.output_dim == 40
    chosen = spec.resolve({"method.tau": 2.0, "optimizer.name": "adamw"})
    assert chosen.method.tau == 2.0 and chosen.optimizer.name == "adamw"


def test_override_sets_nested_fields_with_yaml_values(tmp_path):
    spec = load_spec(write_spec(tmp_path, tiny_spec_dict()),
                     ["training.epochs=7", "method.tau={type: uniform, low: 0.5, high: 1.5}"])
    assert spec.training.epochs == 7
    assert spec.search_ranges()["method.tau"].high == 1.5


BAD_CASES = [
    # (description, raw modifier, overrides, field path, words the message must contain)
    ("unknown key", lambda r: r["training"].update(epoch=3), [], "training.epoch", ["unknown field", "epochs"]),
    ("unknown key via --set", None, ["optimizer.learning_rate=0.1"], "optimizer.learning_rate", ["unknown field", "lr"]),
    ("wrong type", lambda r: r["training"].update(epochs="ten"), [], "training.epochs", ["integer"]),
    ("wrong type via --set", None, ["training.batch_size=abc"], "training.batch_size", ["integer"]),
    ("loguniform low <= 0", lambda r: r["method"].update(tau={"type": "loguniform", "low": 0, "high": 1}), [],
     "method.tau", ["low must be > 0"]),
    ("low > high", lambda r: r["method"].update(lam1={"type": "uniform", "low": 1, "high": -1}), [],
     "method.lam1", ["low (1.0) must be <= high (-1.0)"]),
    ("range outside the field's allowed values", lambda r: r["method"].update(tau={"type": "uniform", "low": -1, "high": 1}),
     [], "method.tau", ["greater than 0"]),
    ("unknown method", lambda r: r["method"].update(name="simclr"), [], "method", ["twist"]),
    ("unknown data set", lambda r: r.update(data={"name": "imagenet"}), [], "data.name", ["fashion_mnist_subset", "cifar10"]),
    ("unknown backbone", lambda r: r.update(backbone={"name": "vit"}), [], "backbone.name", ["small_cnn", "resnet18"]),
    ("missing data root", lambda r: r.update(data={"name": "cifar10"}), [], "data", ["needs data.root"]),
    ("data root that does not exist", lambda r: r.update(data={"name": "cifar10", "root": "/nonexistent/cifar"}), [],
     "data", ["not an existing directory"]),
    ("batch size < 2", None, ["training.batch_size=1"], "training.batch_size", ["greater than or equal to 2"]),
    ("unknown optimizer", None, ["optimizer.name=adam"], "optimizer.name", ["sgd", "lars", "adamw"]),
    ("bad override syntax", None, ["training.epochs"], "training.epochs", ["section.field=value"]),
    ("batch not divisible by workers", None, ["training.batch_size=33", "resources.num_workers=2"],
     "training.batch_size", ["divisible by resources.num_workers"]),
    ("batch larger than the data set", None, ["training.batch_size=20000"], "training.batch_size",
     ["larger than data set", "10000 images"]),
    ("image size past the bound", lambda r: r.update(data={"name": "imagefolder", "root": "/", "image_size": 100000}), [],
     "data.image_size", ["at most 1024", "MiB an image"]),
    ("image size a data set ignores", None, ["data.image_size=96"], "data", ["ignores data.image_size", "remove it"]),
    ("root the bundled data set ignores", None, ["data.root=/"], "data", ["ignores data.root"]),
]


@pytest.mark.parametrize("desc,modify,overrides,path,words", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_exits_2_with_a_message_naming_file_field_and_allowed(tmp_path, capsys, desc, modify, overrides, path, words):
    raw = tiny_spec_dict()
    if modify:
        modify(raw)
    spec_file = write_spec(tmp_path, raw)
    args = ["train", str(spec_file)] + [a for o in overrides for a in ("--set", o)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(spec_file) in err
    assert path in err
    for word in words:
        assert word in err, f"{word!r} missing from:\n{err}"
    assert "Traceback" not in err


def test_unreadable_and_non_mapping_files(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    assert main(["train", str(bad)]) == 2
    assert "mapping" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("training: {epochs: [\n")
    assert main(["train", str(broken)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_a_spec_that_is_not_utf8_is_refused_naming_the_file_and_line(tmp_path, capsys):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: x\n# r\u00e9sum\u00e9\ntraining: {epochs: 2}\n".encode("latin-1"))
    assert main(["validate", str(latin1)]) == 2
    err = capsys.readouterr().err
    assert f"{latin1}:2: not UTF-8" in err and "0xe9" in err and "Traceback" not in err


def test_a_yaml_alias_bomb_is_refused_before_it_is_expanded(tmp_path, capsys):
    """Nine levels of nine aliases: 387 million values once expanded, a few hundred bytes as text."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\ntraining: {epochs: *a8}\n")
    started = time.perf_counter()
    assert main(["validate", str(bomb)]) == 2
    err = capsys.readouterr().err
    assert str(bomb) in err and "aliases" in err and "100,000" in err
    assert time.perf_counter() - started < 10  # refused from the node graph, not by running out of memory
    recursive = tmp_path / "recursive.yaml"
    recursive.write_text("training: &t {epochs: *t}\n")
    assert main(["validate", str(recursive)]) == 2
    assert "recursive" in capsys.readouterr().err
    ordinary = tmp_path / "aliases.yaml"  # aliases within the bound are YAML as usual
    ordinary.write_text("method: {name: twist, lam1: &w 0.5, lam2: *w}\ntraining: {epochs: 2, batch_size: 32}\n")
    assert load_spec(ordinary).method.lam2 == 0.5


def test_a_long_bad_value_is_cut_in_the_error_message(tmp_path, capsys):
    raw = tiny_spec_dict()
    raw["training"]["epochs"] = ["y" * 10_000] * 20  # 200,000 characters
    assert main(["validate", str(write_spec(tmp_path, raw))]) == 2
    err = capsys.readouterr().err
    assert "training.epochs" in err and len(err) < 1000, err


def test_console_script_reports_bad_spec_without_traceback(tmp_path):
    spec_file = write_spec(tmp_path, tiny_spec_dict(training={"batch_size": 1}))
    proc = subprocess.run([sys.executable, "-m", "ssl_tune.cli", "train", str(spec_file)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "training.batch_size" in proc.stderr and str(spec_file) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_resolve_rejects_unknown_paths(twist_spec_path):
    with pytest.raises(SpecError, match="not searchable"):
        load_spec(twist_spec_path).resolve({"method.nonexistent": 1.0})


def test_the_docs_spec_reference_is_the_generated_one():
    from ssl_tune.spec.reference import PAGE, generated_section, reference_markdown

    assert generated_section(PAGE.read_text()) == reference_markdown(), (
        f"{PAGE}'s spec reference is stale: run python -m ssl_tune.spec.reference --write")


@pytest.mark.parametrize("method", method_names())
def test_spec_reference_documents_every_field_of_every_method(method):
    from ssl_tune.spec.reference import reference_markdown
    from trainers import methods

    reference = reference_markdown(methods())
    assert f"`method` with `name: {method}`:" in reference
    for field in methods()[method].Config.model_fields:
        assert f"| `method.{field}` |" in reference, field


@pytest.mark.parametrize("method", method_names())
def test_every_method_search_space_loads_and_resolves_to_its_defaults(method):
    from tests.conftest import method_spec_file

    spec = load_spec(method_spec_file(method))
    assert spec.method.name == method and spec.search_ranges()
    assert spec.resolve().is_resolved
