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
