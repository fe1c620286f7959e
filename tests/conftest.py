import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # for `import oracles`

from sparse_cache import testing  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def processor():
    return testing.tiny_processor()


@pytest.fixture(scope="session")
def sdpa_model():
    return testing.tiny_qwen2_5_vl_model(seed=0, attn_implementation="sdpa")


@pytest.fixture(scope="session")
def eager_model():
    return testing.tiny_qwen2_5_vl_model(seed=0, attn_implementation="eager")


@pytest.fixture(params=["sdpa", "eager"])
def model(request, sdpa_model, eager_model):
    return sdpa_model if request.param == "sdpa" else eager_model


@pytest.fixture(scope="session")
def single_inputs(processor):
    image = testing.synthetic_image(224, 168, seed=1)
    return testing.make_inputs(processor, ["what colour is the square on the left?"], [[image]])


@pytest.fixture(scope="session")
def batch_inputs(processor):
    """Left-padded batch: different images, different visual counts (48 vs 16) and prompt lengths."""
    return testing.make_inputs(
        processor,
        ["what colour is the square on the left?", "count the objects."],
        [[testing.synthetic_image(224, 168, seed=1)], [testing.synthetic_image(112, 112, seed=2)]],
    )


# --------------------------------------------------------------------------- randomized oracle test options


@pytest.fixture(scope="session")
def multi_inputs(processor):
    """Left-padded batch: row 0 has two images (48 + 16 visual tokens), row 1 one (16), different prompt lengths."""
    return testing.make_inputs(
        processor,
        ["what colour is the square on the left?", "count."],
        [[testing.synthetic_image(224, 168, seed=1), testing.synthetic_image(112, 112, seed=3)],
         [testing.synthetic_image(112, 112, seed=2)]],
    )


def pytest_addoption(parser):
    group = parser.getgroup("sparse_cache randomized oracle test (tests/test_randomized.py, docs/testing.md)")
    group.addoption("--random-cases", type=int, default=None,
                    help="number of randomized cases (default 500, or env SPARSE_CACHE_RANDOM_CASES)")
    group.addoption("--random-base", type=int, default=None,
                    help="base seed of the case stream and model pool (default 0, or env SPARSE_CACHE_RANDOM_BASE)")
    group.addoption("--random-case", type=int, default=None,
                    help="run only this case index (the replay command a failure prints)")
    group.addoption("--random-pool", type=int, default=None,
                    help="random model configurations in the pool (default 8, or env SPARSE_CACHE_RANDOM_POOL)")


def pytest_configure(config):
    config.addinivalue_line("markers", "randomized: randomized oracle cases (tests/test_randomized.py)")


def random_settings(config) -> dict:
    def pick(option, env, default):
        value = config.getoption(option)
        if value is None and os.environ.get(env):
            value = int(os.environ[env])
        return default if value is None else value

    return dict(
        cases=pick("--random-cases", "SPARSE_CACHE_RANDOM_CASES", 500),
        base=pick("--random-base", "SPARSE_CACHE_RANDOM_BASE", 0),
        pool=pick("--random-pool", "SPARSE_CACHE_RANDOM_POOL", 8),
        case=config.getoption("--random-case"),
    )
