import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from veridical.tiny import FAMILIES, tiny_inputs, tiny_model  # noqa: E402

torch.set_num_threads(2)

#: Two prompts of different lengths, so batches are left-padded.
QUESTIONS = ["describe this image in detail please", "what is this ?"]


@pytest.fixture(scope="session")
def tiny_models():
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = tiny_model(family)
        return cache[family]

    return get


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def questions():
    return list(QUESTIONS)


@pytest.fixture
def model_and_inputs(tiny_models, family):
    model, processor = tiny_models(family)
    return model, processor, tiny_inputs(family, processor, QUESTIONS)


def _last_logits(model, inputs) -> torch.Tensor:
    """Last-position logits of one plain forward, positions numbered as generate() numbers them."""
    from veridical import get_adapter

    inputs = dict(inputs)
    if model.config.model_type not in ("qwen2_vl", "qwen2_5_vl"):  # M-RoPE models number themselves
        mask = inputs["attention_mask"]
        inputs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    module = get_adapter(model).prefill_module(inputs)
    with torch.no_grad():
        return module(**inputs).logits[:, -1].float()


@pytest.fixture
def last_logits():
    return _last_logits
