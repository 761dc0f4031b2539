import json
import os
import shutil
import sys

import pytest
import torch

from helpers import REFERENCE_DIR, ROOT

sys.path.insert(0, str(ROOT))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def reference():
    """Loader for ../shared/reference files (facts about the original code); skips when absent."""
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"reference data of the original EsViT not found at {REFERENCE_DIR}")

    def load(name):
        path = REFERENCE_DIR / name
        if not path.exists():
            pytest.skip(f"{path} not found")
        if name.endswith('.json'):
            return json.loads(path.read_text())
        return torch.load(path, map_location='cpu', weights_only=True)
    return load


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """32 real Fashion-MNIST images of 4 classes, taken from the embedded demo data."""
    from datasets import demo_data_path
    source = demo_data_path('train')
    root = tmp_path_factory.mktemp('tiny_data')
    for cls in sorted(os.listdir(source))[:4]:
        os.makedirs(root / cls)
        for name in sorted(os.listdir(os.path.join(source, cls)))[:8]:
            shutil.copy(os.path.join(source, cls, name), root / cls / name)
    return str(root)
