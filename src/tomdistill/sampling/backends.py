"""Sampling backends behind one interface: `hf` (transformers), `vllm` (optional), `oracle` and `recorded`
(answers recorded elsewhere: recorded.py).

A backend renders a scenario's prompt, draws completions for generation requests, and scores
scenarios (the exact probability of each action after `Answer:`). The runner owns everything else
(shards, records, parsing, the manifest), so the backends stay small and interchangeable.
"""
from __future__ import annotations

import inspect
from collections import defaultdict
from pathlib import Path

from ..model.loading import ModelLoadError, _get, model_identity
from ..scenarios import ANSWER_PREFIX, Scenario, answer_text, render_prompt
from ..scenarios import oracle
from ..scenarios.prompts import plain_prompt
from .interface import Backend, Completion, GenerationRequest, ScoredScenario
from .settings import SamplerSettings, resolve_device


class OracleBackend(Backend):
    """The analytic reference agent of docs/scenarios.md: exact probabilities, seeded draws, true motivations."""

    @property
    def name(self) -> str:
        return oracle.oracle_identity(self.settings.precision)

    def prompt(self, scenario: Scenario) -> str:
        return plain_prompt(self.messages(scenario))  # no tokenizer, so no chat template

    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        out = []
        for request in requests:
            completions = []
            for seed in request.seeds:
                action = oracle.sample_actions(request.scenario, 1, seed, self.settings.precision)[0]
                if self.settings.role == "teacher":
                    text = answer_text(action, oracle.motivation(request.scenario, action, seed))
                else:
                    text = answer_text(action)
                completions.append(Completion(text, len(text.split())))
            out.append(completions)
        return out

    def score(self, scenarios: list[Scenario]) -> list[ScoredScenario]:
        return [
            ScoredScenario(self.prompt(s), oracle.action_probabilities(s, self.settings.precision), 1.0)
            for s in scenarios
        ]


class HFBackend(Backend):
    """transformers: left-padded batches of prompts, `num_return_sequences` samples each."""

    def __init__(self, cfg, settings: SamplerSettings, shuffle_seed: int | None = None, local_rank: int = 0,
                 cache_dir: str | None = None):
        super().__init__(settings, shuffle_seed)
        import torch

        from ..model.loading import attach_adapter, load_causal_lm, load_tokenizer, resolve_dtype

        model_cfg = cfg.model
        self.name = model_identity(model_cfg)
        self.tokenizer = load_tokenizer(model_cfg, cache_dir, padding_side="left")
        if settings.device_map:  # one model over several GPUs: accelerate places the layers
            from ..devices import check_gpus_usable

            check_gpus_usable(f"sampler.device_map={settings.device_map}")
            device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            device = resolve_device(settings.device, "sampler.device", local_rank)
        dtype_name = settings.dtype if settings.dtype != "auto" else (_get(model_cfg, "dtype") or "auto")
        dtype = resolve_dtype(dtype_name, device)
        model = load_causal_lm(model_cfg, cache_dir, dtype=str(dtype).removeprefix("torch."),
                               device_map=settings.device_map)
        if not settings.device_map:
            model = model.to(device)
        if settings.adapter:
            model = attach_adapter(model, settings.adapter, self.name)
        self.model = model.eval()
        self.device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id
        # transformers 5 names generate's cache argument `cache`; 4.x `past_key_values`
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._cache_argument = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    def prompt(self, scenario: Scenario) -> str:
        return render_prompt(self.tokenizer, self.messages(scenario))

    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        # Split requests into pieces of at most batch_size samples, then batch pieces of equal size
        # together: one generate call encodes each prompt once and returns `size` samples of it.
        size_limit = self.settings.batch_size
        pieces_by_size: dict[int, list[tuple[int, int, list[int]]]] = defaultdict(list)
        for index, request in enumerate(requests):
            for offset in range(0, len(request.seeds), size_limit):
                seeds = request.seeds[offset:offset + size_limit]
                pieces_by_size[len(seeds)].append((index, offset, seeds))
        results: list[list[Completion | None]] = [[None] * len(r.seeds) for r in requests]
        for size, pieces in pieces_by_size.items():
            per_call = max(1, size_limit // size)
            for start in range(0, len(pieces), per_call):
                chunk = pieces[start:start + per_call]
                completions = self._generate_batch([requests[i].prompt for i, _, _ in chunk],
                                                   [s for _, _, seeds in chunk for s in seeds], size)
                for row, (index, offset, seeds) in enumerate(chunk):
                    results[index][offset:offset + size] = completions[row * size:(row + 1) * size]
        return results  # type: ignore[return-value]

    def _generate_batch(self, prompts: list[str], seeds: list[int], per_prompt: int) -> list[Completion]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sampler = RowSeededSampler(seeds, self.settings.temperature, self.settings.top_p, self.device)
        config = GenerationConfig(
            # the sampler above makes the draw; generate's own multinomial then picks its one token
            do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            repetition_penalty=self.settings.repetition_penalty,
            max_new_tokens=self.settings.max_new_tokens,
            num_return_sequences=per_prompt,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
        )
        torch.manual_seed(seeds[0])  # generate's multinomial is certain, but keep any other draw seeded too
        with torch.no_grad():
            extra = self._shared_prefix_cache(encoded, per_prompt) if per_prompt > 1 else {}
            output = self.model.generate(**encoded, generation_config=config,
                                         logits_processor=LogitsProcessorList([sampler]), **extra)
        new = output[:, encoded["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [Completion(text.strip(), n) for text, n in zip(texts, _new_token_counts(new, config.eos_token_id))]

    def _shared_prefix_cache(self, encoded, per_prompt: int) -> dict:
        """Encode each prompt once and copy its key/value cache for its `per_prompt` samples.

        `num_return_sequences` alone would run the prompt through the model once per sample; the
        prompt is most of the work when answers are short. generate then starts from the cache and
        only feeds the prompt's last token.
        """
        ids, mask = encoded["input_ids"][:, :-1], encoded["attention_mask"][:, :-1]
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)  # as generate computes them
        output = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                            logits_to_keep=1)  # only the cache is needed, not logits over the whole prompt
        cache = getattr(output, "cache", None) or output.past_key_values
        cache.batch_repeat_interleave(per_prompt)
        return {self._cache_argument: cache}

    def score(self, scenarios: list[Scenario]) -> list[ScoredScenario]:
        from ..scoring import score_scenarios

        scored = score_scenarios(self.model, self.tokenizer, scenarios, self.settings.role,
                                 self.settings.score_batch_size, self.shuffle_seed)
        return [ScoredScenario(prompt.removesuffix(ANSWER_PREFIX), probs, mass) for prompt, probs, mass in scored]

    def close(self) -> None:
        del self.model


def _new_token_counts(new_tokens, eos_token_id) -> list[int]:
    """Generated tokens per row, up to and including the first end-of-sequence token."""
    import torch

    eos = torch.tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id], device=new_tokens.device)
    is_eos = torch.isin(new_tokens, eos)
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return (~after_eos).sum(-1).tolist()


class RowSeededSampler:
    """A logits processor that draws each row's next token from its own seeded generator.

    Gumbel-max: `argmax(logits / T + G)` with `G` standard Gumbel noise is an exact draw from the
    softmax at temperature `T` (after top-p filtering). The processor returns a score row that is
    -inf everywhere but the drawn token, so `generate`'s own sampling can only pick that token. A
    row's t-th draw depends on its seed alone — not on the batch, its position or the rank — which
    is what makes sampling reproducible shard by shard. `T = 0` is greedy decoding.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device):
        import torch
        from transformers import TopPLogitsWarper

        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None

    def __call__(self, input_ids, scores):
        import torch

        if scores.shape[0] != len(self.generators):
            raise RuntimeError(f"RowSeededSampler: {scores.shape[0]} rows but {len(self.generators)} seeds")
        scores = scores.float()
        if self.temperature > 0:
            scores = scores / self.temperature
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        if self.temperature > 0:
            uniform = torch.stack([
                torch.rand(scores.shape[1], generator=g, device=scores.device) for g in self.generators
            ])
            scores = scores - torch.log(-torch.log(uniform))  # + Gumbel(0, 1); u = 0 gives -inf, never chosen
        choice = scores.argmax(dim=-1, keepdim=True)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, choice, 0.0)


def prepare_vllm_process(local_rank: int, world_size: int, tensor_parallel_size: int) -> dict[str, str | None]:
    """Before a vLLM engine starts in a data-parallel rank: only this rank's GPUs visible, no torchrun variables
    and no torch process group for vLLM to take as its own (it builds its tensor-parallel group itself).
    Returns what changed in the environment (None = removed)."""
    import os

    from .settings import TORCHRUN_VARIABLES, vllm_visible_devices

    changed: dict[str, str | None] = {}
    devices = vllm_visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"), local_rank, world_size,
                                   tensor_parallel_size)
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = changed["CUDA_VISIBLE_DEVICES"] = devices
    for name in TORCHRUN_VARIABLES:
        if name in os.environ:
            del os.environ[name]
            changed[name] = None
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
            changed["torch.distributed"] = None
    except ImportError:
        pass
    return changed


class VLLMBackend(Backend):
    """vLLM (optional, GPU, its own environment: scripts/setup_vllm.sh): tensor parallel generation; exact scoring
    from prompt log-probabilities; an adapter served through `LoRARequest`."""

    def __init__(self, cfg, settings: SamplerSettings, shuffle_seed: int | None = None, cache_dir: str | None = None,
                 local_rank: int = 0, world_size: int = 1):
        super().__init__(settings, shuffle_seed)
        try:
            import vllm
        except ImportError as err:
            raise ModelLoadError(
                "sampler=vllm needs the optional `vllm` package (GPU only) in its own environment: "
                "`bash scripts/setup_vllm.sh`, then run sample.py with .venv-vllm/bin/python (in the pipeline: "
                f"sampler.python=.venv-vllm/bin/python), or use sampler=hf ({err})"
            ) from err
        from ..model.loading import check_adapter_dir, resolve_model_path
        from .settings import vllm_dtype, vllm_max_lora_rank

        self._vllm = vllm
        model_cfg = cfg.model
        self.name = model_identity(model_cfg)
        kwargs = {}
        self.lora_request = None
        if settings.adapter:
            adapter_config = check_adapter_dir(settings.adapter, self.name)
            from vllm.lora.request import LoRARequest

            kwargs.update(enable_lora=True,
                          max_lora_rank=vllm_max_lora_rank(adapter_config.get("r", 16), f"adapter={settings.adapter}"))
            self.lora_request = LoRARequest("adapter", 1, str(Path(settings.adapter).resolve()))
        prepare_vllm_process(local_rank, world_size, settings.tensor_parallel_size)
        self.llm = vllm.LLM(
            model=resolve_model_path(model_cfg, cache_dir),
            tensor_parallel_size=settings.tensor_parallel_size,
            dtype=vllm_dtype(settings.dtype, _get(model_cfg, "dtype")),
            trust_remote_code=bool(_get(model_cfg, "trust_remote_code", False)),
            gpu_memory_utilization=settings.gpu_memory_utilization,
            seed=settings.seed,
            **kwargs,
        )
        self.tokenizer = self.llm.get_tokenizer()
        template = _get(model_cfg, "chat_template")
        if template:
            self.tokenizer.chat_template = template

    def prompt(self, scenario: Scenario) -> str:
        return render_prompt(self.tokenizer, self.messages(scenario))

    def _tokens(self, text: str) -> dict:
        # the chat template already holds any BOS: do not let vLLM add a second one
        return {"prompt_token_ids": self.tokenizer(text, add_special_tokens=False)["input_ids"]}

    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        s = self.settings
        params = [
            self._vllm.SamplingParams(
                n=len(r.seeds), temperature=s.temperature, top_p=s.top_p, repetition_penalty=s.repetition_penalty,
                max_tokens=s.max_new_tokens, seed=r.request_seed,
            )
            for r in requests
        ]
        outputs = self.llm.generate([self._tokens(r.prompt) for r in requests], params,
                                    lora_request=self.lora_request, use_tqdm=False)
        return [[Completion(o.text.strip(), len(o.token_ids)) for o in out.outputs] for out in outputs]

    def score(self, scenarios: list[Scenario]) -> list[ScoredScenario]:
        """Exact: every log-probability is read from vLLM's prompt log-probabilities of a sequence that
        contains the token in question (never from a top-k list that may miss it). Numeric answers also
        need P(no further digit): one sequence per (amount, digit-starting token) gives each of those."""
        import torch

        from ..scoring import action_distribution, answer_logprob, prepare_item, score_prompt

        role = self.settings.role
        items = [prepare_item(self.tokenizer, score_prompt(self.tokenizer, s, role, self.shuffle_seed), s.game.actions)
                 for s in scenarios]
        sequences: list[list[int]] = []
        wanted: list[tuple[int, str, str, int]] = []  # (item, action, "answer" | "extension", tokens read at the end)
        for index, item in enumerate(items):
            for action, cont in zip(item.actions, item.continuation_ids):
                sequences.append(item.prompt_ids + cont)
                wanted.append((index, action, "answer", len(cont)))
                for token in item.extension_ids:
                    sequences.append(item.prompt_ids + cont + [token])
                    wanted.append((index, action, "extension", 1))
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self.llm.generate([{"prompt_token_ids": seq} for seq in sequences], params,
                                    lora_request=self.lora_request, use_tqdm=False)
        answer: dict[tuple[int, str], list[float]] = {}
        extension: dict[tuple[int, str], list[float]] = {}
        for (index, action, kind, n), seq, out in zip(wanted, sequences, outputs):
            values = [pos[token].logprob for pos, token in zip(out.prompt_logprobs[-n:], seq[-n:])]
            (answer if kind == "answer" else extension).setdefault((index, action), []).extend(values)
        scored = []
        for index, item in enumerate(items):
            logprobs = {}
            for action in item.actions:
                after = extension.get((index, action))
                logprobs[action] = float(answer_logprob(torch.tensor(answer[(index, action)], dtype=torch.float64),
                                                        torch.tensor(after, dtype=torch.float64) if after else None))
            probs, mass = action_distribution(logprobs)
            scored.append(ScoredScenario(item.prompt.removesuffix(ANSWER_PREFIX), probs, mass))
        return scored


def make_backend(cfg, settings: SamplerSettings, shuffle_seed: int | None, local_rank: int = 0,
                 cache_dir: str | None = None, world_size: int = 1) -> Backend:
    if settings.backend == "oracle":
        return OracleBackend(settings, shuffle_seed)
    if settings.backend == "recorded":
        from .recorded import RecordedBackend

        return RecordedBackend.from_config(cfg, settings, shuffle_seed)
    if settings.backend == "hf":
        return HFBackend(cfg, settings, shuffle_seed, local_rank, cache_dir)
    return VLLMBackend(cfg, settings, shuffle_seed, cache_dir, local_rank, world_size)


def backend_model_name(cfg, settings: SamplerSettings) -> str:
    """The `model` field of the records, known without loading the model."""
    if settings.backend == "recorded":
        from .recorded import recorded_model_name

        return recorded_model_name(settings)
    return oracle.oracle_identity(settings.precision) if settings.backend == "oracle" else model_identity(cfg.model)
