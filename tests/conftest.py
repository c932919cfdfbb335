import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from veridical.evals.pope_build import build_pope, write_questions  # noqa: E402
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


# -- a tiny saved model and a tiny COCO-format dataset, for the eval and sweep commands --------------

CATEGORIES = {1: "person", 2: "dog", 3: "cat", 4: "car", 5: "bench", 6: "cup"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    images, annotations, captions = [], [], []
    rng = np.random.default_rng(0)
    for image_id in range(1, 9):
        name = f"COCO_val2014_{image_id:012d}.jpg"
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")).save(root / name)
        images.append({"id": image_id, "file_name": name, "height": 40, "width": 48})
        present = [1 + (image_id + k) % 6 for k in range(3)]
        for cat in present:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [0, 0, 4, 4],
                    "area": 16,
                    "iscrowd": 0,
                }
            )
        captions.append(
            {
                "id": image_id,
                "image_id": image_id,
                "caption": f"A {CATEGORIES[present[0]]} next to a {CATEGORIES[present[1]]}.",
            }
        )
    cats = [{"id": k, "name": v} for k, v in CATEGORIES.items()]
    (root / "instances_val2014.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": cats})
    )
    (root / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": captions}))
    objects = {
        img["file_name"]: [CATEGORIES[a["category_id"]] for a in annotations if a["image_id"] == img["id"]]
        for img in images
    }
    write_questions(build_pope(objects, "adversarial", num_images=4, seed=0), root / "pope.json")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llava")
    model, processor = tiny_model("llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
