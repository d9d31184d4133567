import pytest
import torch


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """Eight small Python-like text files: a corpus the command-line tests train on in seconds."""
    d = tmp_path_factory.mktemp("corpus")
    for i in range(8):
        (d / f"doc{i}.txt").write_text(("def f(x):\n    return x * %d\n\n" % i) * 40)
    return d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    import os

    # MFU's denominator: a fixed number, so that no test spends seconds measuring the machine's
    # matmul peak under the load of the other tests, nor writes that number into the user's
    # cache (tests/train/test_train_hardware_peak.py measures into a temporary cache on purpose)
    os.environ.setdefault("SPEEDLM_PEAK_FLOPS", "1e12")
    # the processes tests start (torchrun, `python -m speedlm`, Ray workers) import this
    # checkout's code, not whatever copy pip last installed in editable mode
    src = str(config.rootpath / "src")
    os.environ["PYTHONPATH"] = os.pathsep.join([src] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    # one BLAS thread per xdist worker: two workers on two cores must not oversubscribe
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
