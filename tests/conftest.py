"""Shared fixtures: small shard sets built once per test session through the real CLI."""
from pathlib import Path

import pytest
import torch

from shards.__main__ import main as shards_main

REPO = Path(__file__).resolve().parents[1]


def build_builtin(out: Path, train: int, val: int, test: int, shard_size: int, *extra: str) -> Path:
    code = shards_main(["build", "--source", "builtin", "--out", str(out), "--train-images", str(train),
                        "--val-images", str(val), "--test-images", str(test), "--shard-size", str(shard_size),
                        "--min-concept-count", "2", *extra])
    assert code in (0, None)
    return out


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """96 train pictures in 6 shards of 16, 32 val, 32 test: enough for streaming and split tests."""
    return build_builtin(tmp_path_factory.mktemp("tiny") / "builtin", 96, 32, 32, 16)


# train, val, test pictures, shard size, options: a corpus big enough that a short run learns something
# measurable (bench/test_margins.py builds the same one to measure the learning tests' margins)
SMALL_CORPUS = (1024, 100, 100, 128, "--pos", "NOUN,ADJ")


@pytest.fixture(scope="session")
def uneven_shards(tmp_path_factory) -> Path:
    """96 train pictures in 3 shards of 32; val and test of 24 pictures in ONE shard each, as the built-in
    corpus's val split is: with 2 ranks one of them embeds nothing at evaluation and must still join."""
    return build_builtin(tmp_path_factory.mktemp("uneven") / "builtin", 96, 24, 24, 32)


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """A corpus big enough that a short training run learns something measurable."""
    return build_builtin(tmp_path_factory.mktemp("small") / "builtin", *SMALL_CORPUS)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (pytestmark = pytest.mark.usefixtures("one_torch_thread")): on a shared 2-core
    machine two threads contend and run convolutions about 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
