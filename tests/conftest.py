import os

import pytest
import torch

# One intra-op thread per process, as on a rank; keeps timings sane on 2 cores.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    for item in items:
        if item.get_closest_marker("gpu") and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


from tests.support import checkpoints, hf_reference  # noqa: E402,F401  (session fixtures)
