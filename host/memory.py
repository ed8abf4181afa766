"""Peak training memory of a LoRA/QLoRA run, from a model's architecture numbers alone (no download).

peak = weights + LoRA parameters, gradients and AdamW states + activations + logits + framework overhead

Some terms depend on the backend that trains (`backend`): transformers + PEFT (the CPU image, and a GPU
without Unsloth), or Unsloth (the `auto` backend in the GPU images).

- Weights: parameters × bytes of the dtype; 4-bit (NF4 with double quantization) is 4.127 bits per
  parameter, 8-bit 1 byte plus a scale per row; bitsandbytes skips embeddings and lm_head, which PEFT's
  prepare_model_for_kbit_training then upcasts to float32 (Unsloth keeps them 16-bit).
- LoRA: r × (in + out) parameters per adapted matrix per layer, trained in float32: weight, gradient
  and AdamW's two moments, 16 bytes each.
- Activations, per token and layer (Korthikanti et al., 2022, "Reducing Activation Recomputation",
  with memory-efficient attention, so no sequence² term): what backward keeps of a block:
  its normed inputs, q/k/v and the attention output, the MLP's up/gate products and their activation,
  and with LoRA dropout PEFT's dropped-out copy of each adapted module's input. With gradient
  checkpointing only each layer's input is kept, plus the layer being recomputed and its gradients. Unsloth's checkpointing moves each layer's input to pinned host RAM as soon as the layer has
  run (unsloth_zoo's offloaded checkpointer), so the GPU keeps only its two staging buffers of one input.
- Logits: on CPU the runner uses the model's own loss over the full logits: batch × sequence × vocab, and
  at the loss four float32 buffers as large (the upcast copy, the log-softmax, and the gradients of both).
  On CUDA, TRL's SFTTrainer scores through its fused LM head (trl.kernels.chunked_logprob): lm_head and the
  log-softmax in tiles of TRL_TILE_TOKENS × TRL_TILE_VOCAB, never the whole logits, plus the float32 gradient
  of the hidden states it reads. The tile lives only while the head runs, so with checkpointing the peak is
  the larger of the head's moment and a recomputed layer's backward, not their sum (measured on an H200).
  Unsloth's fused cross-entropy never builds them: it runs lm_head and the loss chunk by chunk, each chunk
  at most UNSLOTH_CE_CHUNK (16 bytes per token and vocabulary entry: bf16 logits, fp32 copy,
  log-softmax, gradient), plus the gradient of the final hidden states.
- Overhead: the CUDA context, cuBLAS workspaces and allocator slack on a GPU; on CPU the Python process
  with torch and transformers imported. The GPU figures are the allocator's reserved peak, so activations
  carry no further fragmentation slack there; on CPU they do (ALLOCATOR_SLACK).

Which terms have been checked against measured peaks, and where, is forge.host.calibration's to say.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANT_BYTES = {"4bit": 4.127 / 8, "8bit": 1.0 + 2 / 4096}
LORA_BYTES_PER_PARAM = 16  # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq
GPU_OVERHEAD = 0.9 * GIB  # CUDA context (~0.5 GiB), cuBLAS/cuDNN workspaces
CPU_OVERHEAD = 363 * 2**20  # RSS of the CPU image's python after importing the training stack (measured)
ALLOCATOR_SLACK = {"cpu": 1.10, "cuda": 1.0}  # on activations; a GPU's reserved peak already holds the slack
BACKENDS = ("transformers", "unsloth")
UNSLOTH_CE_BYTES_PER_LOGIT = 16  # unsloth_zoo's _CE_BYTES_PER_LOGIT
UNSLOTH_CE_CHUNK = 4 * GIB  # unsloth_zoo's per-chunk cap (_CE_CAP_MIN_GB; it also stays under half of what is free)
UNSLOTH_OFFLOAD_BUFFERS = 2  # the offloaded checkpointer's double-buffered GPU staging of one layer's input
TRL_TILE_TOKENS = 4096  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE (TRL 1.15)
TRL_TILE_VOCAB = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
TRL_STATS_BYTES = 32  # per token: the fused head's float32 running statistics


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model (catalog entry or config.json)."""

    params: float
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool

    @classmethod
    def of(cls, entry) -> Shape:
        return cls(entry.params_m * 1e6, entry.layers, entry.hidden, entry.heads, entry.kv_heads, entry.attention_dim,
                   entry.intermediate, entry.vocab, entry.tied_embeddings)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    def matrix(self, module: str) -> tuple[int, int] | None:
        """(in, out) features of a LoRA target module, by its usual name."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        shapes = {
            "q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
            "o_proj": (q, self.hidden), "qkv_proj": (self.hidden, q + 2 * kv),
            "gate_proj": (self.hidden, self.intermediate), "up_proj": (self.hidden, self.intermediate),
            "gate_up_proj": (self.hidden, 2 * self.intermediate), "down_proj": (self.intermediate, self.hidden),
            "c_attn": (self.hidden, 3 * self.hidden), "c_proj": (self.hidden, self.hidden),
            "query_key_value": (self.hidden, q + 2 * kv), "dense": (q, self.hidden),
        }
        return shapes.get(module)


TERMS = ("weights", "lora", "activations", "logits", "overhead")
LABELS = {"weights": "weights", "lora": "LoRA params + grads + AdamW", "activations": "activations",
          "logits": "logits and loss", "overhead": "framework overhead", "total": "total"}


@dataclass(frozen=True)
class Breakdown:
    weights: float
    lora: float
    activations: float
    logits: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.lora + self.activations + self.logits + self.overhead

    def terms(self) -> list[tuple[str, float]]:
        """(term, bytes) for each term and the total, in the order `forge plan --explain` shows them."""
        return [*((term, getattr(self, term)) for term in TERMS), ("total", self.total)]

    def rows(self) -> list[tuple[str, float]]:
        return [(LABELS[term], value) for term, value in self.terms()]


def lora_params(shape: Shape, targets: list[str], rank: int) -> int:
    per_layer = sum(rank * (m[0] + m[1]) for name in targets if (m := shape.matrix(name)))
    return shape.layers * per_layer


def activation_bytes_per_token_layer(shape: Shape, dtype_bytes: int, targets: list[str] = (),
                                     lora_dropout: float = 0.0) -> float:
    """Tensors a decoder block keeps for backward, per token (memory-efficient attention, transformers' code):
    attention: the block input and its norm; q after RoPE; k and v as SDPA gets them (grouped-query
    attention without repeating them per query head, `enable_gqa`); SDPA's output and the contiguous copy
    o_proj reads. MLP: input and norm; gate, its SiLU, up, and their product (down_proj's input). With LoRA
    dropout, each adapted module's input once more: PEFT's dropped-out copy that lora_A reads."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attention = 2 * shape.hidden + 3 * q + 2 * kv
    mlp = 2 * shape.hidden + 4 * shape.intermediate
    dropped = sum(m[0] for name in targets if (m := shape.matrix(name))) if lora_dropout > 0 else 0
    return dtype_bytes * (attention + mlp + dropped) + shape.hidden  # + dropout/residual masks (1 byte)


def fused_head_bytes(shape: Shape, tokens: int, dtype_bytes: int, quantization: str) -> float:
    """TRL's fused LM head at its peak: one tile of logits in the compute dtype (float32 under QLoRA, whose
    lm_head PEFT upcasts), the float32 gradient of the hidden states and the per-token statistics."""
    tile_bytes = 4 if quantization != "none" else dtype_bytes
    return (min(tokens, TRL_TILE_TOKENS) * TRL_TILE_VOCAB * tile_bytes
            + tokens * (4 * shape.hidden + TRL_STATS_BYTES))


def estimate(shape: Shape, *, dtype: str, quantization: str, targets: list[str], rank: int, seq_len: int,
             micro_batch: int, checkpointing: bool, accelerator: str, backend: str = "transformers",
             lora_dropout: float = 0.0) -> Breakdown:
    """The peak for one setting. `backend` is what trains: "transformers" (+ PEFT; the model's own loss on
    CPU, TRL's fused LM head on CUDA) or "unsloth" (its offloaded checkpointing and chunked cross-entropy;
    CUDA only)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    unsloth = backend == "unsloth"
    if unsloth and accelerator != "cuda":
        raise ValueError("the unsloth backend runs on CUDA only")
    dtype_bytes = DTYPE_BYTES[dtype]
    if quantization == "none":
        weights = shape.params * dtype_bytes
    else:  # embeddings and lm_head stay unquantized: float32 after PEFT's k-bit preparation, 16-bit in Unsloth
        embeddings = shape.embedding_params
        weights = (shape.params - embeddings) * QUANT_BYTES[quantization] + embeddings * (dtype_bytes if unsloth else 4)
    lora = lora_params(shape, targets, rank) * LORA_BYTES_PER_PARAM
    tokens = micro_batch * seq_len
    per_layer = activation_bytes_per_token_layer(shape, dtype_bytes, targets, lora_dropout) * tokens
    layer_input = tokens * shape.hidden * dtype_bytes
    slack = ALLOCATOR_SLACK[accelerator]
    fused = accelerator == "cuda" and not unsloth  # TRL's fused LM head
    if checkpointing:  # each layer's input kept (on the host with Unsloth); the layer being recomputed and its grads
        kept = UNSLOTH_OFFLOAD_BUFFERS * layer_input if unsloth else shape.layers * layer_input
        activations = (kept + 2 * per_layer) * slack
    else:
        activations = shape.layers * per_layer * slack
    if unsloth:  # chunked lm_head + loss, and the gradient of the hidden states it reads
        logits = min(tokens * shape.vocab * UNSLOTH_CE_BYTES_PER_LOGIT, UNSLOTH_CE_CHUNK) + layer_input
    elif fused:
        head = fused_head_bytes(shape, tokens, dtype_bytes, quantization)
        # checkpointed: the head's moment (the kept inputs and the tile) or a layer's backward, whichever is larger
        logits = max(0.0, kept + head - activations) if checkpointing else head
    else:
        logits = tokens * shape.vocab * (dtype_bytes + 4 * 4)  # logits; fp32 copy, log-softmax and two gradients
    overhead = GPU_OVERHEAD if accelerator == "cuda" else CPU_OVERHEAD
    return Breakdown(weights, lora, activations, logits, overhead)


def offloaded_bytes(shape: Shape, *, dtype: str, seq_len: int, micro_batch: int) -> float:
    """Pinned host RAM that Unsloth's offloaded checkpointing fills: every layer's input, once."""
    return shape.layers * micro_batch * seq_len * shape.hidden * DTYPE_BYTES[dtype]
