"""Shared fixtures and helpers: tiny specs and data, the method registry's test specs, and running
the `ssl-tune` console script. Test modules import helpers from here, never from one another."""

import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

# Data caches the tests build go to a fresh directory, never to the user's ~/.cache/ssl-tune (inherited
# by every process the tests start), removed when this process ends.
os.environ["SSL_TUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="ssl-tune-test-cache-")
atexit.register(shutil.rmtree, os.environ["SSL_TUNE_CACHE_DIR"], ignore_errors=True)

# The cores shared among pytest-xdist's workers: threads beyond them only contend (and spin) with the other
# worker's tests.
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SSL_TUNE = str(Path(sys.executable).parent / "ssl-tune")
# Methods for the tests, found as a researcher's own are (`$SSL_TUNE_METHOD_PATH`): twist_oom.py
TEST_METHODS = os.path.join(ROOT, "tests", "methods")


@pytest.fixture
def twist_spec_path():
    return os.path.join(ROOT, "search_spaces", "twist.yaml")


def tiny_spec_dict(**sections):
    """A small resolved TWIST spec for fast tests; sections override whole sections."""
    raw = {
        "name": "tiny",
        "method": {"name": "twist", "lam1": 0.0, "lam2": 1.0, "tau": 1.0},
        "backbone": {"name": "small_cnn", "width": 4},
        "projector": {"hidden_dim": 16, "output_dim": 8, "num_layers": 2},
        "optimizer": {"name": "lars", "lr": 0.3, "warmup_epochs": 0},
        "training": {"epochs": 2, "batch_size": 32, "seed": 0},
        "evaluation": {"linear_probe_epochs": 2},
    }
    raw.update(sections)
    return raw


def write_spec(directory: Path, raw: dict, name: str = "spec.yaml") -> Path:
    path = Path(directory) / name
    path.write_text(yaml.safe_dump(raw))
    return path


def tiny_dataset(n=96, size=12, seed=0):
    from ssl_tune.data.datasets import ImageDataset

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 4
    return ImageDataset("tiny", images, labels, images[:32].clone(), labels[:32].clone(), 4)


def image_folder(root: Path, classes=("a", "b"), per_class=3, size=12) -> Path:
    """A tiny ImageFolder of random JPEGs: train/ and test/, `per_class` images of each class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg", quality=90)
    return root


# --- every registered method -------------------------------------------------------------------

# Settings the shared suites exercise beyond a method's search-space defaults: SSL-HSIC's learned
# bandwidth has its own optimizer (resumed exactly, and its gradient must match under DDP).
SUITE_METHOD_SETTINGS = {"ssl_hsic": {"learn_bandwidth": True, "bandwidth_lr": 0.05, "num_rff_features": 64}}


def method_names():
    """Every method the registry finds (the shared suites are parametrized over these)."""
    from trainers import methods

    return list(methods())


def method_spec_file(name: str) -> Path:
    """A method's search-space YAML: search_spaces/NAME.yaml, or NAME.yaml next to a method module
    found through $SSL_TUNE_METHOD_PATH."""
    from trainers import method_path

    for directory in (Path(ROOT) / "search_spaces", *method_path()):
        if (directory / f"{name}.yaml").is_file():
            return directory / f"{name}.yaml"
    raise FileNotFoundError(f"no search-space YAML for method {name!r}")


def method_spec_dict(name: str, **sections) -> dict:
    """A tiny resolved spec of method `name`: its YAML's method settings at their defaults, with the
    tiny shared sections of `tiny_spec_dict`."""
    from ssl_tune.spec.files import load_spec

    method = load_spec(method_spec_file(name)).resolve().model_dump(mode="json")["method"]
    method.update(SUITE_METHOD_SETTINGS.get(name, {}))
    return {**tiny_spec_dict(**sections), "method": method}


class FakeTrial:
    """What Tune's callbacks read of a trial (the tracking and console callbacks' tests)."""

    def __init__(self, trial_id, config):
        self.trial_id, self.config, self.last_result, self.error_file = trial_id, config, {}, None


# --- the console script ------------------------------------------------------------------------

SEARCH_EPOCHS = 2
SMALL_SUBSET = 0.2  # 2,000 of the bundled 10,000 training images: what a test needs is epochs, not their size


def search_spec(**search):
    """A 3-trial TWIST search of 2 epochs on a fifth of the bundled images; ASHA stops trial 2 (its loss is
    much higher at epoch 1)."""
    raw = tiny_spec_dict(training={"epochs": SEARCH_EPOCHS, "batch_size": 500, "seed": 0}, data={"subset": SMALL_SUBSET})
    raw["name"] = "search-test"
    raw["method"].update(lam2={"type": "uniform", "low": 0.5, "high": 2.0},
                         tau={"type": "loguniform", "low": 0.5, "high": 2.0})
    raw["search"] = {"num_samples": 3, "metric": "loss", "mode": "min", "grace_period": 1, "max_concurrent": 1,
                     "points_to_evaluate": [{"method.lam2": 2.0, "method.tau": 1.0},
                                            {"method.lam2": 0.5, "method.tau": 1.0}], **search}
    return raw


FAULT_SUBSET = 0.5  # half the bundled images: epochs of about a second, so a signal sent once one is reported lands mid-trial


def slow_search_spec(num_samples, epochs, **search):
    """Trials one at a time, of epochs long enough (`FAULT_SUBSET`) that a signal sent once an epoch is reported
    lands inside the trial: the fault tests' search."""
    raw = search_spec(num_samples=num_samples, scheduler="none", points_to_evaluate=[], max_concurrent=1, **search)
    raw["training"], raw["data"] = {"epochs": epochs, "batch_size": 250, "seed": 0}, {"subset": FAULT_SUBSET}
    return raw


def ray_started() -> bool:
    """Whether this process has started (or joined) Ray: an in-process refusal must come before it."""
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def cli_env():
    return {**os.environ, "MLFLOW_TRACKING_URI": "", "RAY_ADDRESS": ""}


@pytest.fixture
def cli_here(tmp_path, monkeypatch, capsys):
    """`ssl-tune ARGS` in this process, in tmp_path (or `cwd=`): `cli_here("resume", "x")` -> (exit status,
    stdout, stderr). For the checks that need no process boundary (a refusal before Ray starts, results, list,
    export); what the command sets in the environment (MLflow's HTTP retry bounds) is undone after the test."""
    from ssl_tune.cli import main
    from ssl_tune.process_env import HTTP_RETRY_DEFAULTS

    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):  # as `cli_env` gives a subprocess
        monkeypatch.setenv(key, "")  # (recorded: the test's end restores it, whatever the command set)
        monkeypatch.delenv(key)
    for key, value in HTTP_RETRY_DEFAULTS.items():
        monkeypatch.setenv(key, os.environ.get(key, value))

    def run(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
        monkeypatch.chdir(cwd or tmp_path)
        status = main(list(args))
        printed = capsys.readouterr()
        return status, printed.out, printed.err

    return run


def run_cli(args, cwd, timeout=600, env=None):
    return subprocess.run([SSL_TUNE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**cli_env(), **(env or {})})


def start_cli(args, cwd, env=None):
    """`ssl-tune ARGS` in its own process group, output to a file (Ray's output would fill a pipe)."""
    log = open(Path(cwd) / f"cli-{time.time_ns()}.log", "w+")
    proc = subprocess.Popen([SSL_TUNE, *args], cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env={**cli_env(), **(env or {})}, start_new_session=True)
    proc.log = log
    return proc


def output(proc) -> str:
    proc.log.flush()
    return Path(proc.log.name).read_text()


def printed_command(out: str, label: str) -> list[str]:
    """The arguments of the `ssl-tune ...` command printed after `label`, checked to run this ssl-tune
    as printed (by a path, or by name from PATH)."""
    import shlex
    import shutil

    line = next(line for line in out.splitlines() if line.startswith(label))
    program, *args = shlex.split(line.removeprefix(label))
    found = shutil.which(program)
    assert found and Path(found).resolve() == Path(SSL_TUNE).resolve(), f"{program!r} does not run ssl-tune: {line}"
    return args


def wait_for(condition, timeout: float, what: str, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}: " + output(proc)[-4000:])
        time.sleep(0.5)  # (a condition that reads an MLflow store costs tens of milliseconds of CPU)
    raise AssertionError(f"timed out waiting for {what}")


def runs_of(work: Path, experiment: str = "search-test"):
    """(client, parent runs, trial runs) of an experiment in WORK's sqlite store."""
    from ssl_tune import tracking

    client = tracking.client_for(f"sqlite:///{work}/mlflow.db")
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    parents = [r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "search"]
    children = [r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "trial"]
    return client, parents, children


def epoch_steps(client, run) -> list[int]:
    return [m.step for m in client.get_metric_history(run.info.run_id, "epoch")]


# --- searches shared by the tests that only read their results -----------------------------------
# Session-scoped: each runs once (under pytest-xdist, on the one worker that runs every test using it).


@pytest.fixture(scope="session")
def finished_search(tmp_path_factory):
    """A finished ASHA search (`search_spec` on all images: 3 trials of 2 epochs; ASHA stops the second), named s1:
    (directory, MLflow client, the `ssl-tune run` process)."""
    from ssl_tune import tracking

    work = tmp_path_factory.mktemp("search")
    # On all the bundled images: its tests score checkpoints with the whole training split as the kNN bank (what
    # the trials logged), and read system metrics sampled while the trials trained.
    (work / "spec.yaml").write_text(yaml.safe_dump({**search_spec(), "data": {}}))
    # MLflow's system metrics every second (10 s by default): these trials take a few seconds
    proc = run_cli(["run", "spec.yaml", "--name", "s1"], cwd=work, env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, tracking.client_for(f"sqlite:///{work}/mlflow.db"), proc


@pytest.fixture(scope="session")
def proxy_search(tmp_path_factory):
    """A proxy search, confirmed at a larger setting: 3 trials of 1 epoch on a fifth of the images, then the 3
    best re-trained on twice as many for 2 epochs on 2 seeds; named proxy: (directory, client, process, its spec)."""
    from ssl_tune import tracking

    work = tmp_path_factory.mktemp("proxy")
    raw = search_spec(num_samples=3, points_to_evaluate=[], max_concurrent=2,
                      confirm={"top_k": 3, "seeds": 2, "default": False,
                               "overrides": {"training.epochs": 2, "data.subset": 2 * SMALL_SUBSET}})
    raw["training"]["epochs"] = 1
    (work / "proxy.yaml").write_text(yaml.safe_dump(raw))
    proc = run_cli(["run", "proxy.yaml", "--name", "proxy"], cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, tracking.client_for(f"sqlite:///{work}/mlflow.db"), proc, raw


def publish_release(monkeypatch, cls, folder: Path) -> None:
    """Make the synthetic files in `folder` the 'official release' of torchvision's reader `cls`:
    its MD5 lists then name these files' checksums (torchvision checks them before reading)."""
    from torchvision.datasets.utils import calculate_md5

    def checked(entries):
        return [[name, calculate_md5(str(folder / name))] for name, _ in entries]

    monkeypatch.setattr(cls, "train_list", checked(cls.train_list))
    monkeypatch.setattr(cls, "test_list", checked(cls.test_list))
    if hasattr(cls, "meta"):
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": calculate_md5(str(folder / cls.meta["filename"]))})


def namespaces_allowed() -> bool:
    """Whether this process may make network namespaces (root with iproute2)."""
    name = f"ssl-tune-probe-{os.getpid()}"
    try:
        made = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    except OSError:  # no `ip`
        return False
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return made


# The commands that provide the system packages some tests need (Debian, as root); `.ci/run` runs them.
CHROMIUM_INSTALL = "apt-get install -y chromium"
POSTGRES_INSTALL = "apt-get install -y postgresql"
IPROUTE_INSTALL = "apt-get install -y iproute2 (and run the tests as root, to make network namespaces)"


def on_ci() -> bool:
    """Whether the tests run under CI (`CI` set to anything but empty, 0 or false; `.ci/run` sets it)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_system(available: bool, what: str, install: str) -> None:
    """A test that needs a system package: outside CI it skips where the package is missing, saying
    the command that installs it; under CI (which installs it) it fails instead."""
    if available:
        return
    if on_ci():
        pytest.fail(f"CI lacks {what}: .ci/run must provide it ({install})")
    pytest.skip(f"needs {what}; install it with: {install}")


@contextlib.contextmanager
def small_disk(directory: Path, megabytes: int):
    """A tmpfs of `megabytes` mounted at `directory` (root only): a disk that fills. Unmounted after."""
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(directory)],
                             capture_output=True).returncode == 0
    require_system(mounted, "a small tmpfs to fill (mount -t tmpfs needs root)",
                   "run the tests as root (CI does)")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def _memory_cgroup_parent() -> tuple[Path, str] | None:
    """Where this process may make a child memory cgroup, and its limit file: cgroup v2 (`memory.max`)
    where the unified hierarchy has the memory controller, else v1 (`memory.limit_in_bytes`)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        if number == "0" and controllers == "":
            for mount in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                controllers_file = mount / "cgroup.controllers"
                if controllers_file.exists() and "memory" in controllers_file.read_text().split():
                    return mount / path.lstrip("/"), "memory.max"
        elif "memory" in controllers.split(","):
            here = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if here.is_dir():
                return here, "memory.limit_in_bytes"
    return None


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int):
    """A child memory cgroup limited to `limit_bytes` (root, with the kernel's memory controller, v1 or
    v2); yields a command prefix that runs a command inside it. Removed after, by its PIDs first."""
    parent = _memory_cgroup_parent()
    group = None
    if parent is not None:
        group = parent[0] / f"ssl-tune-test-{os.getpid()}"
        try:
            group.mkdir(exist_ok=True)
            (group / parent[1]).write_text(str(limit_bytes))
        except OSError:
            group = None
    require_system(group is not None, "the kernel's cgroup memory controller (writable, as root)",
                   "run the tests as root on a kernel with the memory cgroup (CI does)")
    try:
        yield ["sh", "-c", f'echo $$ > {group / "cgroup.procs"} && exec "$@"', "in-cgroup"]
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                os.kill(int(pid), 9)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.2)


# --- time limits -------------------------------------------------------------------------------

QUICK_TEST_TIMEOUT_S = 120  # the quick subset's limit per test; slow tests have pyproject's `timeout` (600 s)


def _shared_fixtures(item) -> list[str]:
    """The module- or session-scoped fixtures of tests/ that `item` uses: what it shares with other tests."""
    defined_here = ("test_", "conftest")
    return sorted(name for name, defs in item._fixtureinfo.name2fixturedefs.items()
                  if defs[-1].scope in ("module", "session")
                  and defs[-1].func.__module__.rpartition(".")[2].startswith(defined_here))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(items):
    """A quick test that hangs fails after 2 minutes, not 10 (pytest-timeout, with every thread's stack).
    Under pytest-xdist (`-n N --dist loadgroup`), tests that share a costly fixture run on one worker, so
    it is built once; and the slow tests go first, so that no long test starts last and runs alone."""
    for item in items:
        if item.get_closest_marker("slow") is None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(QUICK_TEST_TIMEOUT_S))
        shared = _shared_fixtures(item)
        if shared:
            item.add_marker(pytest.mark.xdist_group("+".join(shared)))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """pytest-xdist's `loadgroup` keeps a group on one worker by the `@group` its hook appends to each test id;
    pytest 9.2 ignores that write (pytest-xdist#1386), and every shared fixture was then built on both workers."""
    if getattr(session.config.option, "loadgroup", False):  # (an xdist worker, under --dist loadgroup)
        lost = [item.nodeid for item in session.items
                if item.get_closest_marker("xdist_group") is not None and "@" not in item.nodeid]
        if lost:
            raise pytest.UsageError(f"pytest-xdist dropped the xdist_group of {len(lost)} tests ({lost[0]}, ...): "
                                    "this pytest breaks --dist loadgroup (pytest-xdist#1386); install requirements.lock's")
