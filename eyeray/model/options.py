"""How a loaded model runs, as one object that every route takes: `eyeray score`
(`ScoreConfig.inference`), Serve (`ServeArgs.inference`), the scoring actors and Serve replicas
(`eyeray.model.bundle.load`) and `eyeray explain`. Each setting's default and help are written here
once; the flags of every command are generated from these fields (`eyeray.config_cli`).

Batch size is not among them: scoring sets images per model call (`--batch-size`), Serve the most
requests one call batches (`max_batch_size`, retuned live through `user_config`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class InferenceOptions:
    """Test-time augmentation, XLA and 16-bit compute (`eyeray.model.compiled`)."""

    tta: bool = field(
        default=False,
        metadata={"help": "test-time augmentation: mean over the image and its mirror (2x model time)"},
    )
    jit_compile: bool = field(
        default=False,
        metadata={"help": "compile the model with XLA (often faster on GPUs; slower on the CPUs measured)"},
    )
    mixed_precision: bool = field(
        default=False,
        metadata={
            "help": "float16 inference on GPUs, bfloat16 on CPUs with AVX512-BF16 or AMX (TensorFlow's "
            "mixed-precision rewrite; outputs stay float32); elsewhere float32"
        },
    )
