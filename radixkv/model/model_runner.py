"""`ModelRunner`: the model, its attention backend and sampler over the scheduler's KV pools."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from radixkv.mem.kv_quant import QUANTIZED, key_rotation
from radixkv.mem.req_to_token_pool import ReqToTokenPool
from radixkv.mem.token_to_kv_pool import KVLayout, TokenToKVPool
from radixkv.model import cpu_fused
from radixkv.model.attention import AttentionBackend
from radixkv.model.config import ModelConfig
from radixkv.model.decode_graphs import DecodeGraphs
from radixkv.model.dtype import resolve_dtype
from radixkv.model.forward_batch import ForwardBatch
from radixkv.model.llama import LlamaForCausalLM
from radixkv.model.loader import load_model
from radixkv.model.prepack import make_row_invariant
from radixkv.model.sampler import Sampler
from radixkv.protocol import SamplingParams, TokenLogprob


def kv_layout(
    config: ModelConfig,
    dtype: torch.dtype | str | None = None,
    model_dtype: torch.dtype = torch.float32,
) -> KVLayout:
    """The KV pool layout of `config`; its dtype follows the model's unless `dtype` is given:
    a dtype, its name, or `int8` / `fp8_e4m3` / `fp8_e5m2` (a quantized pool, `kv_quant.py`)."""
    if dtype is None or dtype == "auto":
        kv_dtype = model_dtype
    elif isinstance(dtype, str) and dtype in QUANTIZED:
        kv_dtype = QUANTIZED[dtype][0]
    else:
        kv_dtype = resolve_dtype(dtype)
    return KVLayout(config.num_layers, config.num_kv_heads, config.head_dim, kv_dtype)


def create_backend(name: str, **kwargs: object) -> AttentionBackend:
    """Instantiate an attention backend by name (`torch`, `triton`)."""
    if name == "torch":
        from radixkv.model.torch_backend import TorchNativeBackend

        return TorchNativeBackend(**kwargs)  # type: ignore[arg-type]
    if name == "triton":
        from radixkv.model.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(**kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown attention backend {name!r}; available: torch, triton")


class ModelRunner:
    """Runs forward passes of `ForwardBatch`es and samples next tokens.

    The caller (the scheduler) owns the pools: it allocates `out_cache_loc`, writes request rows
    and frees slots. The runner only writes K/V into the slots a batch names.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        token_pool: TokenToKVPool,
        req_pool: ReqToTokenPool,
        backend: str | AttentionBackend = "torch",
        deterministic: bool = False,
    ) -> None:
        """`deterministic`: batch-invariant results (the torch backend on the CPU only): every
        projection gives a row the same result in any batch (`prepack.make_row_invariant`) and
        every attention goes through one per-query kernel (`torch_backend.py`); raises
        RuntimeError where that cannot be had."""
        config = model.config
        layout = token_pool.layout
        if (layout.num_layers, layout.kv_heads, layout.head_dim) != (
            config.num_layers, config.num_kv_heads, config.head_dim,
        ):  # fmt: skip
            raise ValueError(
                f"KV pool layout {layout} does not fit the model ({config.num_layers} layers, "
                f"{config.num_kv_heads} KV heads, head dim {config.head_dim})"
            )
        if model.device.type == "cpu":
            model.prepack()
        model.fused_ops = cpu_fused.usable(model.dtype, model.device)
        if deterministic:
            if backend != "torch" or model.device.type != "cpu":
                raise RuntimeError(
                    "deterministic inference is implemented for the torch attention backend on "
                    "the CPU"
                )
            make_row_invariant(model.layers, model.packed_head)
        self.model = model
        self.config = config
        self.token_pool = token_pool
        self.req_pool = req_pool
        self.dtype = model.dtype
        if isinstance(backend, str):
            backend = create_backend(
                backend,
                token_pool=token_pool,
                req_pool=req_pool,
                num_heads=config.num_heads,
                num_kv_heads=config.num_kv_heads,
                head_dim=config.head_dim,
                dtype=model.dtype,
                **({"deterministic": True} if deterministic else {}),
            )
        backend.key_rotation = None
        if layout.rotated_keys:
            # in the model's dtype where that holds it exactly (+-1/8 for a head of 64),
            # otherwise float32: queries and keys must meet through one orthogonal matrix
            rotation = key_rotation(config.head_dim).to(token_pool.device)
            exact = torch.equal(rotation.to(model.dtype).float(), rotation)
            backend.key_rotation = rotation.to(model.dtype) if exact else rotation
        self.backend = backend
        self.sampler = Sampler(config.eos_token_ids)
        self.decode_graphs: DecodeGraphs | None = None

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        *,
        num_slots: int,
        max_running_requests: int,
        max_context_len: int | None = None,
        dtype: str | torch.dtype = "auto",
        kv_dtype: str | torch.dtype | None = None,
        page_size: int = 1,
        device: torch.device | str = "cpu",
        backend: str = "torch",
    ) -> ModelRunner:
        """Load `model` and create pools of `num_slots` KV slots and `max_running_requests` rows."""
        net = load_model(model, dtype=dtype, device=device)
        return cls.with_pools(
            net, num_slots=num_slots, max_running_requests=max_running_requests,
            max_context_len=max_context_len, kv_dtype=kv_dtype, page_size=page_size,
            backend=backend,
        )  # fmt: skip

    @classmethod
    def with_pools(
        cls,
        model: LlamaForCausalLM,
        *,
        num_slots: int,
        max_running_requests: int,
        max_context_len: int | None = None,
        kv_dtype: str | torch.dtype | None = None,
        page_size: int = 1,
        backend: str = "torch",
    ) -> ModelRunner:
        """A runner over fresh pools sized for `model` (KV dtype follows the model's unless set)."""
        layout = kv_layout(model.config, kv_dtype, model.dtype)
        token_pool = TokenToKVPool(layout, num_slots, page_size=page_size, device=model.device)
        context = max_context_len or model.config.max_position_embeddings
        req_pool = ReqToTokenPool(max_running_requests, context, device=model.device)
        return cls(model, token_pool, req_pool, backend)

    @property
    def device(self) -> torch.device:
        """Where the model, the KV pool and a ForwardBatch's tensors live."""
        return self.model.device

    def capture_decode_graphs(self, max_bs: int, mode: str = "cuda") -> DecodeGraphs:
        """Capture decode steps of up to `max_bs` requests as CUDA graphs, which `forward`
        replays from now on (`decode_graphs.py`; `mode="eager"`: the same path without a GPU)."""
        self.decode_graphs = None  # the old graphs' memory goes back before the new capture
        self.decode_graphs = DecodeGraphs(
            self.model, self.backend, self.req_pool.max_context_len, max_bs, mode
        )
        return self.decode_graphs

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """float32 logits `[bs, vocab]` of each request's last token; K/V written to the pool.
        A decode batch a captured graph fits is replayed from it: its logits are then a view
        valid until the next forward."""
        if self.decode_graphs is not None and self.decode_graphs.can_run(batch):
            return self.decode_graphs.replay(batch)
        self.backend.init_forward(batch)
        return self.model(batch, self.backend)

    @torch.inference_mode()
    def forward_hidden(self, batch: ForwardBatch) -> torch.Tensor:
        """The final hidden states of `batch.output_rows` (K/V written to the pool, as
        `forward`); `logits` and `token_logprobs` turn rows of them into what is needed."""
        self.backend.init_forward(batch)
        return self.model(batch, self.backend, hidden=True)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)

    @torch.inference_mode()
    def token_logprobs(
        self, hidden: torch.Tensor, targets: Sequence[int], top: int, rows_per_slice: int = 256
    ) -> list[TokenLogprob]:
        """Log probability of `targets[i]` after the position of `hidden[i]` (prompt log
        probabilities: the target is the next prompt token), with the `top` most likely; logits
        are made `rows_per_slice` rows at a time (a 2048-token prompt's would be 400 MB)."""
        out: list[TokenLogprob] = []
        params = [SamplingParams(logprobs=True, top_logprobs=top)]
        for start in range(0, hidden.shape[0], rows_per_slice):
            part = hidden[start : start + rows_per_slice]
            ids = torch.tensor(targets[start : start + part.shape[0]], device=part.device)
            lps = self.logprobs(self.model.logits(part), ids, params * part.shape[0])
            out.extend(lp for lp in lps if lp is not None)
        return out

    @torch.inference_mode()
    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None] | None = None,
        outputs: Sequence[Sequence[int]] | None = None,
        prompts: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """Next token ids `[bs]` (int64); `generators` (one per request, see `make_generator`)
        make seeded requests reproducible; `outputs` and `prompts` (each request's tokens so
        far) feed the penalties."""
        return self.sampler(logits, params, generators, outputs, prompts)

    @staticmethod
    def logprobs(
        logits: torch.Tensor, token_ids: torch.Tensor, params: Sequence[SamplingParams]
    ) -> list[TokenLogprob | None]:
        """Each asking request's token log probability and its top ones: a float32 log-softmax
        of the model's logits (before any sampling adjustment); None for the others."""
        rows = [i for i, p in enumerate(params) if p.logprobs]
        out: list[TokenLogprob | None] = [None] * len(params)
        if not rows:
            return out
        lp = torch.log_softmax(logits[rows].float(), dim=-1)
        chosen = lp.gather(1, token_ids[rows][:, None]).squeeze(1).tolist()
        k = max(params[i].top_logprobs for i in rows)
        top_lp, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        top_lp_rows, top_id_rows = top_lp.tolist(), top_ids.tolist()
        for j, i in enumerate(rows):
            n = params[i].top_logprobs
            out[i] = TokenLogprob(
                int(token_ids[i]), chosen[j], top_id_rows[j][:n], top_lp_rows[j][:n]
            )
        return out
