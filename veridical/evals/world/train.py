"""Training the world model from scratch: captions and yes/no questions about random scenes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path

import torch

from veridical.evals.samples import CHAIR_PROMPT
from veridical.evals.world.model import world_model, world_processor
from veridical.evals.world.scenes import CLASSES, LARGE, SMALL, caption, draw_scene

POPE_TEMPLATE = "Is there a {} in the image?"


@dataclass
class TrainConfig:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    question_fraction: float = 0.5
    pair_p: float = 0.9
    #: Share of scenes drawn with large, clean glyphs (the rest small and noisy).
    large_fraction: float = 0.5
    seed: int = 0
    #: Torch's CPU threads. One thread is what the shipped checkpoints were trained with: the thread count
    #: splits torch's sums differently, so another count gives other weights.
    threads: int = 1


#: CPU flags that decide which vectorised kernels torch, MKL and oneDNN run (and so how sums round).
KERNEL_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "asimd",
    "sve",
)
#: Environment variables that change torch's CPU kernels or thread counts.
KERNEL_VARIABLES = (
    "ATEN_CPU_CAPABILITY",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu() -> dict:
    """Model name, vendor and kernel-relevant flags from ``/proc/cpuinfo`` (Linux; elsewhere the name)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {
        "model": fields.get("model name") or platform.processor() or None,
        "vendor": fields.get("vendor_id") or fields.get("CPU implementer"),
        "logical_cpus": os.cpu_count(),
        "kernel_flags": [flag for flag in KERNEL_FLAGS if flag in flags],
    }


def _veridical_commit() -> str | None:
    """The git commit of the veridical checkout that trained (``+dirty`` with local changes), else None."""
    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():  # an installed package, not a checkout
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "veridical"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def training_environment() -> dict:
    """What a bit-for-bit retrain must match besides the config: library versions, torch's CPU kernels
    and threads, the CPU and the OS.

    The weights depend on the rounding of every sum in 3000 steps, and that rounding follows the kernels
    torch dispatches: the ATen vector width (``cpu_capability``), MKL's and oneDNN's code path for the
    CPU, and the split of work between threads. Two runs on one machine with one thread give the same
    bytes; another CPU kernel path or thread count gives another model of the same recipe.
    """
    build = torch.__config__.show()
    parallel = torch.__config__.parallel_info().splitlines()

    def after(needle: str, lines: list[str]) -> str | None:
        """The rest of the first line holding ``needle``, after it."""
        found = next((row for row in lines if needle in row), None)
        return found.split(needle, 1)[1].strip(" ,") if found is not None else None

    return {
        "versions": {
            "python": platform.python_version(),
            "veridical": _version("veridical"),
            "veridical_commit": _veridical_commit(),
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "tokenizers": _version("tokenizers"),
            "numpy": _version("numpy"),
            "pillow": _version("pillow"),
        },
        "torch": {
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkl": torch.backends.mkl.is_available(),
            "mkldnn": torch.backends.mkldnn.is_available(),
            "openmp": torch.backends.openmp.is_available(),
            "blas": (after("BLAS_INFO=", build.split(", ")) or "").split(",")[0] or None,
            "mkl_version": after("Math Kernel Library Version", parallel),
            "mkldnn_version": after("MKL-DNN", parallel) or after("oneDNN", parallel),
            "parallel_backend": after("ATen parallel backend:", parallel),
        },
        "cpu": _cpu(),
        "os": {"platform": platform.platform(), "machine": platform.machine(), "python_build": sys.version},
        "variables": {name: os.environ[name] for name in KERNEL_VARIABLES if name in os.environ},
    }


def _prompt(processor, question: str) -> str:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def make_batch(processor, rng: random.Random, config: TrainConfig):
    """``(inputs, labels)``: prompts with image tokens, answers appended, loss on the answers only."""
    tok = processor.tokenizer
    images, prompts, answers = [], [], []
    for _ in range(config.batch_size):
        regime = LARGE if config.large_fraction and rng.random() < config.large_fraction else SMALL
        scene = draw_scene(rng, replace(regime, pair_p=config.pair_p))
        images.append(scene.image)
        if rng.random() < config.question_fraction:
            present = rng.random() < 0.5
            pool = scene.objects if present else sorted(set(CLASSES) - set(scene.objects))
            prompts.append(_prompt(processor, POPE_TEMPLATE.format(rng.choice(pool))))
            answers.append("yes" if present else "no")
        else:
            prompts.append(_prompt(processor, CHAIR_PROMPT))
            answers.append(caption(scene.objects))
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    answer_ids = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in answers]
    width = max(len(a) for a in answer_ids)
    rows, labels, masks = [], [], []
    for prompt_ids, prompt_mask, ans in zip(
        inputs["input_ids"], inputs["attention_mask"], answer_ids, strict=True
    ):
        pad = width - len(ans)
        rows.append(torch.cat([prompt_ids, torch.tensor(ans + [tok.pad_token_id] * pad)]))
        masks.append(torch.cat([prompt_mask, torch.tensor([1] * len(ans) + [0] * pad)]))
        labels.append(torch.cat([torch.full_like(prompt_ids, -100), torch.tensor(ans + [-100] * pad)]))
    batch = {
        "input_ids": torch.stack(rows),
        "attention_mask": torch.stack(masks),
        "pixel_values": inputs["pixel_values"],
    }
    return batch, torch.stack(labels)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each example's answer tokens, averaged per example and then over the batch.

    Averaging per example keeps one-word yes/no answers from being drowned by twenty-token captions.
    """
    shifted, targets = logits[:, :-1].float(), labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    ).view(targets.shape)
    mask = targets != -100
    return ((token_loss * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def train_world(output: str | Path, config: TrainConfig | None = None, log_every: int = 100) -> list[float]:
    """Train from ``config.seed`` and save model and processor to ``output``; returns the loss curve."""
    config = config or TrainConfig()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    processor = world_processor()
    model = world_model(processor).train()
    rng = random.Random(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def schedule(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses, start = [], time.perf_counter()
    for step in range(config.steps):
        batch, labels = make_batch(processor, rng, config)
        loss = answer_loss(model(**batch).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            print(
                f"step {step + 1}/{config.steps} loss {recent:.4f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    model.eval()
    output = Path(output)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    (output / "training.json").write_text(
        json.dumps(
            {
                "config": asdict(config),
                "small": asdict(SMALL),
                "large": asdict(LARGE),
                "final_loss": sum(losses[-100:]) / min(100, len(losses)),
                "seconds": round(time.perf_counter() - start, 1),
                "environment": training_environment(),
                # A retrain gives the same bytes with the same code, libraries, CPU kernels and threads.
                "model_sha256": hashlib.sha256((output / "model.safetensors").read_bytes()).hexdigest(),
            },
            indent=1,
        )
    )
    return losses
