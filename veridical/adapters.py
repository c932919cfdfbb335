"""Model adapters: what veridical needs to know about each vision-language family.

An adapter answers, for one loaded model, the questions every method asks: where the image tokens
are in each row of ``input_ids``, which modules form the text decoder (layers, attention, final norm,
``lm_head``), and how to build the inputs of a contrast branch (noised image, blank image, prompt
without the image). The family is read from ``model.config.model_type``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from veridical.errors import InputError, UnsupportedModelError

Inputs = Mapping[str, Any]


def check_prompt_batch(inputs: Inputs) -> None:
    """Checks of a batch that need no model; :class:`InputError` (one line) unless ``inputs`` hold at
    least one prompt, an ``attention_mask`` of the same shape, and left padding only.

    A right-padded row (padding at its end) would generate after its padding (transformers only
    warns), so it is refused.
    """
    if not isinstance(inputs, Mapping):
        raise InputError(
            f"inputs must be the processor's output (a dict of tensors), got {type(inputs).__name__}"
        )
    if "input_ids" not in inputs:
        raise InputError("inputs have no 'input_ids'; pass the processor's output")
    input_ids = inputs["input_ids"]
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__
        raise InputError(f"input_ids must be a (batch, seq) tensor, got {shape}")
    if input_ids.shape[0] == 0:
        raise InputError("inputs hold no prompt (input_ids has 0 rows): pass at least one prompt")
    mask = inputs.get("attention_mask")
    if mask is None:
        return
    if mask.shape != input_ids.shape:
        raise InputError(
            f"attention_mask shape {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    real = mask.bool()
    if input_ids.shape[1] == 0 or not real.any(dim=-1).all():
        empty = (~real.any(dim=-1)).nonzero().flatten().tolist() if input_ids.shape[1] else "all"
        raise InputError(f"row(s) {empty} of the batch hold no token (attention_mask is all padding)")
    # Only padding at the end of a row misleads generation (it would continue after the padding);
    # InstructBLIP's processor puts the left padding of the text after the image's query tokens.
    right_padded = (~real[:, -1]).nonzero().flatten().tolist()
    if right_padded:
        raise InputError(
            f"row(s) {right_padded} of the batch are right-padded (attention_mask has padding after real "
            'tokens); generation needs left padding: set processor.tokenizer.padding_side = "left" before '
            "calling the processor"
        )


def check_generate_inputs(model: nn.Module, inputs: Inputs) -> None:
    """What :func:`veridical.generate` checks for every call, ``methods=[]`` included: the batch
    (:func:`check_prompt_batch`) and, for a supported family, that image tokens and images agree.
    Prompts without images are allowed here (methods that need one check it themselves)."""
    check_prompt_batch(inputs)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ADAPTERS:
        adapter = ADAPTERS[model_type](model)
        if inputs.get("pixel_values") is not None or adapter.image_mask(inputs["input_ids"]).any():
            adapter.check_images(inputs)


class ModelAdapter:
    """Family-independent view of a Hugging Face vision-language model.

    Subclasses override the few places where families differ. Instances are cheap; build one with
    :func:`get_adapter`.
    """

    family: str = ""
    #: What a prompt writes where the image goes when the processor has no chat template.
    image_placeholder: str = "<image>"
    #: Input keys that carry the image and are dropped when the image is removed.
    image_input_keys: tuple[str, ...] = ("pixel_values",)
    #: Token ids, besides the image token itself, that belong to the image placeholder.
    image_wrapper_token_attrs: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.text_config = model.config.text_config

    # -- image tokens -------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        for attr in ("image_token_id", "image_token_index"):
            value = getattr(self.config, attr, None)
            if value is not None:
                return int(value)
        raise UnsupportedModelError(f"{self.family} config has no image token id")

    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Boolean ``(batch, seq)`` mask of the positions that hold image features."""
        return input_ids == self.image_token_id

    def image_spans(self, input_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
        """Per row, the ``[start, end)`` runs of image positions (one run per image)."""
        mask = self.image_mask(input_ids).to(torch.int8)
        edges = torch.diff(
            mask, dim=1, prepend=mask.new_zeros(mask.shape[0], 1), append=mask.new_zeros(mask.shape[0], 1)
        )
        spans = []
        for row in edges:
            starts = (row == 1).nonzero().flatten().tolist()
            ends = (row == -1).nonzero().flatten().tolist()
            spans.append(list(zip(starts, ends, strict=True)))
        return spans

    def validate_inputs(self, inputs: Inputs) -> None:
        """Raise :class:`InputError` unless ``inputs`` hold a left-padded batch where every row has an
        image and the image tokens match the images."""
        check_prompt_batch(inputs)
        input_ids = inputs["input_ids"]
        if inputs.get("pixel_values") is None:
            raise InputError("inputs have no 'pixel_values': the processor was called without images")
        counts = self.image_mask(input_ids).sum(dim=1)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise InputError(
                f"row(s) {empty} of input_ids contain no image token (id {self.image_token_id}); "
                "put the family's image placeholder in the prompt or use the processor's chat template"
            )
        self.check_images(inputs)

    def check_images(self, inputs: Inputs) -> None:
        """:class:`InputError` unless the image tokens of ``input_ids`` are as many as the images need.

        Placeholders and images that do not pair up fail inside the model with a message about
        features; here the error names both counts.
        """
        input_ids = inputs["input_ids"]
        tokens = int(self.image_mask(input_ids).sum())
        runs = sum(len(spans) for spans in self.image_spans(input_ids))
        images = self.image_count(inputs) if inputs.get("pixel_values") is not None else 0
        needed = self.image_token_counts(inputs) if images else []
        if needed is None:  # per-image counts unknown: only more placeholder runs than images is sure
            if runs <= images:
                return
        elif tokens == sum(needed):
            return
        else:
            # Adjacent placeholders form one run; where every image takes the same number of tokens
            # the token count says how many placeholders there are.
            if needed and len(set(needed)) == 1 and tokens % needed[0] == 0:
                runs = tokens // needed[0]
        need = f" ({sum(needed)} image tokens)" if needed else ""
        raise InputError(
            f"input_ids hold {runs} image placeholder run(s) ({tokens} image tokens) but the inputs carry "
            f"{images} image(s){need}: give one image per placeholder and build input_ids and images "
            "with the same processor call"
        )

    def image_token_counts(self, inputs: Inputs) -> list[int] | None:
        """How many image tokens each image of ``inputs`` takes in ``input_ids`` (``None``: unknown)."""
        # LLaVA: the vision tower's sequence (patches, plus CLS for CLIP, none for SigLIP), less the
        # first position under the "default" feature strategy.
        tower = getattr(getattr(self.model, "model", None), "vision_tower", None)
        positions = getattr(getattr(tower, "embeddings", None), "num_positions", None)
        if positions is None:
            return None
        strategy = getattr(self.config, "vision_feature_select_strategy", "default")
        return [int(positions) - (strategy == "default")] * self.image_count(inputs)

    def image_count(self, inputs: Inputs) -> int:
        """How many images the pixel tensors hold."""
        return int(inputs["pixel_values"].shape[0])

    def batch_size(self, inputs: Inputs) -> int:
        return int(inputs["input_ids"].shape[0])

    def split_inputs(self, inputs: Inputs) -> list[dict[str, Any]]:
        """One input dict per prompt, left padding removed, each with its own images."""
        input_ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        images_per_row = [len(spans) for spans in self.image_spans(input_ids)]
        per_token = [k for k, v in inputs.items() if torch.is_tensor(v) and v.shape[:2] == input_ids.shape]
        samples, first_image = [], 0
        for row, count in enumerate(images_per_row):
            keep = mask[row].bool()
            sample = {k: inputs[k][row : row + 1][:, keep] for k in per_token}
            sample["attention_mask"] = torch.ones_like(sample["input_ids"])
            sample.update(self._images_of(inputs, row, first_image, first_image + count))
            samples.append(sample)
            first_image += count
        return samples

    def _images_of(self, inputs: Inputs, row: int, first: int, last: int) -> dict[str, Any]:
        """The image tensors of images ``first..last-1`` (prompt ``row``)."""
        return {k: inputs[k][first:last] for k in self.image_input_keys if inputs.get(k) is not None}

    # -- text decoder -------------------------------------------------------------------------
    @property
    def text_model(self) -> nn.Module:
        """The decoder stack (embeddings, ``layers``, ``norm``) without the LM head."""
        return self.model.model.language_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.text_model.layers

    @property
    def attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.layers]

    @property
    def final_norm(self) -> nn.Module:
        return self.text_model.norm

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def embed_tokens(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.text_config, "num_key_value_heads", None) or self.num_heads)

    @property
    def head_dim(self) -> int:
        explicit = getattr(self.text_config, "head_dim", None)
        return int(explicit or self.text_config.hidden_size // self.num_heads)

    # -- contrast branches ----------------------------------------------------------------------
    def map_pixels(self, inputs: Inputs, fn) -> dict[str, Any]:
        """Copy of ``inputs`` with ``fn`` applied to the (normalised) pixel tensor."""
        out = dict(inputs)
        out["pixel_values"] = fn(inputs["pixel_values"])
        return out

    def without_image(self, inputs: Inputs) -> dict[str, Any]:
        """The same prompts with the image placeholder tokens removed, re-padded on the left."""
        input_ids = inputs["input_ids"]
        mask = inputs.get("attention_mask", torch.ones_like(input_ids))
        keep = ~self._placeholder_mask(input_ids) & mask.bool()
        rows = [input_ids[i][keep[i]] for i in range(input_ids.shape[0])]
        width = max(len(r) for r in rows)
        if width == 0:
            raise InputError("the prompt is empty once the image is removed")
        pad = self.pad_token_id
        new_ids = input_ids.new_full((len(rows), width), pad)
        new_mask = torch.zeros_like(new_ids)
        for i, row in enumerate(rows):
            new_ids[i, width - len(row) :] = row
            new_mask[i, width - len(row) :] = 1
        dropped = set(self.image_input_keys) | {"input_ids", "attention_mask", "mm_token_type_ids"}
        out = {k: v for k, v in inputs.items() if k not in dropped}
        out.update(input_ids=new_ids, attention_mask=new_mask)
        return out

    def _placeholder_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = self.image_mask(input_ids)
        for attr in self.image_wrapper_token_attrs:
            token = getattr(self.config, attr, None)
            if token is not None:
                mask |= input_ids == token
        return mask

    @property
    def pad_token_id(self) -> int:
        for source in (self.model.generation_config, self.text_config, self.config):
            value = getattr(source, "pad_token_id", None)
            if value is not None:
                return int(value)
        return 0

    # -- running a branch on its own cache -----------------------------------------------------
    def prefill_position_ids(self, inputs: Inputs) -> torch.Tensor:
        """Position ids for a prompt, as ``generate`` computes them (left padding skipped)."""
        mask = inputs["attention_mask"]
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def next_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Positions of one new token following the last column of ``position_ids``."""
        return position_ids[..., -1:] + 1

    def run_prompt(self, inputs: Inputs, **kwargs: Any) -> Any:
        """One forward of whole prompts, positions numbered as ``generate`` numbers them; no cache kept."""
        inputs = dict(inputs)
        if inputs.get("attention_mask") is None:
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        position_ids = self.prefill_position_ids(inputs)
        return self.prefill_module(inputs)(**inputs, position_ids=position_ids, use_cache=False, **kwargs)

    def prefill_module(self, inputs: Inputs) -> nn.Module:
        """Module that runs the prompt (image included) of a branch."""
        return self.model

    def decode_module(self) -> nn.Module:
        """Module that runs one new text token of a branch against its cache."""
        return self.model


class LlavaAdapter(ModelAdapter):
    family = "llava"


class LlavaNextAdapter(ModelAdapter):
    family = "llava_next"
    image_input_keys = ("pixel_values", "image_sizes")

    def image_token_counts(self, inputs: Inputs) -> list[int] | None:
        # Any-resolution images take a number of tokens that depends on their size: run the model's
        # own packing on one-dimensional zero features (no vision tower) and read its lengths.
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        sizes = inputs.get("image_sizes")
        if sizes is None or len(sizes) != self.image_count(inputs):
            return None
        config, vision = self.config, self.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        try:
            patches = [
                image_size_to_num_patches(size, config.image_grid_pinpoints, int(vision.image_size))
                for size in sizes
            ]
            newline = None if getattr(self.model.model, "image_newline", None) is None else torch.zeros(1)
            _, lengths = self.model.model.pack_image_features(
                [torch.zeros(n, side * side, 1) for n in patches],
                sizes,
                config.vision_feature_select_strategy,
                image_newline=newline,
            )
        except (RuntimeError, ValueError, TypeError, AttributeError):
            return None
        return [int(n) for n in lengths]


class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2_vl"
    image_placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    image_input_keys = ("pixel_values", "image_grid_thw")
    image_wrapper_token_attrs = ("vision_start_token_id", "vision_end_token_id")

    def map_pixels(self, inputs: Inputs, fn) -> dict[str, Any]:
        # Pixels arrive as flattened patches (patches, C * T * P * P) where the T temporal copies of
        # a still image are identical; apply fn to one copy so both stay the same image.
        out = dict(inputs)
        pixels = inputs["pixel_values"]
        t = int(self.config.vision_config.temporal_patch_size)
        p = int(self.config.vision_config.patch_size)
        channels = pixels.shape[1] // (t * p * p)
        grid = pixels.view(pixels.shape[0], channels, t, p, p)
        first = fn(grid[:, :, :1])
        out["pixel_values"] = first.expand_as(grid).reshape(pixels.shape).contiguous()
        return out

    def image_count(self, inputs: Inputs) -> int:
        grid = inputs.get("image_grid_thw")
        if grid is None:
            raise InputError(
                "Qwen-VL inputs need 'image_grid_thw' next to 'pixel_values' (the processor's output)"
            )
        patches, held = int(grid.prod(dim=-1).sum()), int(inputs["pixel_values"].shape[0])
        if patches != held:
            raise InputError(f"pixel_values hold {held} patches but image_grid_thw describes {patches}")
        return int(grid.shape[0])

    def image_token_counts(self, inputs: Inputs) -> list[int] | None:
        merge = int(self.config.vision_config.spatial_merge_size)
        return [int(n) // merge**2 for n in inputs["image_grid_thw"].prod(dim=-1)]

    def _images_of(self, inputs: Inputs, row: int, first: int, last: int) -> dict[str, Any]:
        # Pixels are flattened patches of all images together: each image has prod(grid) rows.
        grid = inputs["image_grid_thw"]
        patches = grid.prod(dim=-1).cumsum(0).tolist()
        start, end = ([0, *patches][first], [0, *patches][last])
        return {"pixel_values": inputs["pixel_values"][start:end], "image_grid_thw": grid[first:last]}

    def prefill_position_ids(self, inputs: Inputs) -> torch.Tensor:
        if inputs.get("image_grid_thw") is None:
            return super().prefill_position_ids(inputs).unsqueeze(0).expand(3, -1, -1)
        position_ids, _ = self.model.model.get_rope_index(
            inputs["input_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
        )
        return position_ids

    def next_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        # A text token after the prompt sits one past the largest position of its row in all three
        # M-RoPE axes.
        return position_ids.amax(dim=(0, 2), keepdim=True).expand(3, -1, 1) + 1


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"


class InstructBlipAdapter(ModelAdapter):
    family = "instructblip"
    image_placeholder = ""  # InstructBlipProcessor prepends the query-token placeholders itself
    image_input_keys = ("pixel_values", "qformer_input_ids", "qformer_attention_mask")

    def validate_inputs(self, inputs: Inputs) -> None:
        super().validate_inputs(inputs)
        if not self.config.use_decoder_only_language_model:
            raise UnsupportedModelError(
                "InstructBLIP with an encoder-decoder language model (Flan-T5) is not supported; "
                "use a Vicuna-based checkpoint"
            )

    def image_token_counts(self, inputs: Inputs) -> list[int] | None:
        return [int(self.config.num_query_tokens)] * self.image_count(inputs)

    @property
    def text_model(self) -> nn.Module:
        return self.model.language_model.model

    def _images_of(self, inputs: Inputs, row: int, first: int, last: int) -> dict[str, Any]:
        # The Q-Former's instruction tokens belong to the prompt row, not to an image.
        out = {"pixel_values": inputs["pixel_values"][first:last]}
        for key in ("qformer_input_ids", "qformer_attention_mask"):
            if inputs.get(key) is not None:
                out[key] = inputs[key][row : row + 1]
        return out

    def prefill_module(self, inputs: Inputs) -> nn.Module:
        return self.model if "pixel_values" in inputs else self.model.language_model

    def decode_module(self) -> nn.Module:
        return self.model.language_model


ADAPTERS: dict[str, type[ModelAdapter]] = {
    cls.family: cls
    for cls in (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, Qwen2_5_VLAdapter, InstructBlipAdapter)
}
SUPPORTED_FAMILIES = tuple(ADAPTERS)


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``, chosen from ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        return ADAPTERS[model_type](model)
    except KeyError:
        raise UnsupportedModelError(
            f"model_type {model_type!r} ({type(model).__name__}) is not supported; "
            f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
        ) from None
