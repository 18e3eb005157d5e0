"""The engine on a CUDA device (bf16 compute): skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from tests.numerics.test_against_peft import check_mixed_batch_against_peft

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", ["llama", "phi", "falcon"])
def test_mixed_batch_matches_peft_on_gpu(arch, model_factory, adapter_factory):
    # bf16 compute: logits within bf16 resolution, and the same greedy tokens.
    check_mixed_batch_against_peft(arch, model_factory, adapter_factory, torch.device("cuda"), tol=3e-2)
