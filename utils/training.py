"""Training machinery: processes, parallelism (applied from outside the model), schedule, EMA and checkpoints.

Checkpoints are torch.distributed.checkpoint (DCP) folders `<logdir>/checkpoints/step-<N>`, written to
`step-<N>.tmp` and renamed once every rank has finished, so a folder without `.tmp` is always complete; the newest
`keep` are kept.  They hold everything a run needs to continue exactly: model, EMA, optimizers, step, epoch, data
position and every random state.  `export_weights` writes a consolidated single-file safetensors (our parameter
names are the official ones) with the model configuration in its metadata, for sampling.
"""
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from transformer_flow import AttentionBlock, MetaBlock, Model, NonCausalBlock
from utils.config import TRAINING_ONLY_FIELDS, ConfigError, one_line
from utils.files import plain_mode


# ---- processes ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Processes:
    """This process's place among the ones torchrun started (or the only one)."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def all_min(self, value: float) -> float:
        """The minimum of a number over all processes."""
        if self.world_size == 1:
            return value
        t = torch.tensor([float(value)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t.item()

    def all_mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean of each number over all processes (one all-reduce)."""
        if self.world_size == 1:
            return values
        t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(values, (t / self.world_size).tolist()))


def init_processes(device: str | None = None) -> Processes:
    """Join torchrun's process group if launched by torchrun (gloo on CPU, NCCL on CUDA), else run alone."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "RANK" not in os.environ:
        return Processes(device=device)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        backend, device_id = ("nccl", device) if device.type == "cuda" else ("gloo", None)
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        if attempt:  # a group torchrun restarted: its store still holds the dead group's addresses, under the same keys
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
            dist.init_process_group(backend, store=dist.PrefixStore(f"attempt-{attempt}", store), rank=rank,
                                    world_size=world, device_id=device_id)
        else:
            dist.init_process_group(backend, device_id=device_id)
    local, cores = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), len(os.sched_getaffinity(0))
    if device.type == "cpu" and local_rank == 0 and local * torch.get_num_threads() > max(cores, local):
        print(f"note: {local} processes with {torch.get_num_threads()} thread(s) each on {cores} CPU cores are "
              f"oversubscribed (several times slower); set OMP_NUM_THREADS={max(1, cores // local)} (torchrun's default "
              "is 1)")
    return Processes(rank, local_rank, world, device)


# ---- parallelism --------------------------------------------------------------------------------------------------
def device_mesh(procs: Processes, replicate: int = 1):
    """The device mesh FSDP2 shards over: 1-D over all processes, or with `replicate` > 1 the 2-D (replicate, shard)
    mesh of HSDP: the model is sharded within each group of world_size / replicate consecutive ranks (a node, with
    torchrun's rank order) and replicated across the groups, so that the all-gathers stay inside a node and only
    the gradient all-reduce crosses nodes (torch.distributed.fsdp.fully_shard with a 2-D mesh; torchtitan's
    data_parallel_replicate_degree).  Raises ConfigError when `replicate` does not divide the processes."""
    from torch.distributed.device_mesh import init_device_mesh

    check_replicate(procs, True, replicate)
    if replicate == 1:
        return init_device_mesh(procs.device.type, (procs.world_size,))
    return init_device_mesh(procs.device.type, (replicate, procs.world_size // replicate),
                            mesh_dim_names=("replicate", "shard"))


def check_replicate(procs: Processes, fsdp: bool, replicate: int):
    """ConfigError unless `replicate` HSDP groups can be made: FSDP, several processes, a divisor of their number."""
    if replicate > 1 and not (fsdp and procs.world_size > 1):
        raise ConfigError(f"--fsdp_replicate {replicate} needs --fsdp 1 and several processes")
    if procs.world_size % replicate:
        raise ConfigError(f"--fsdp_replicate {replicate} does not divide the {procs.world_size} processes")


def parallelize(model: Model, procs: Processes, fsdp: bool, bf16: bool, replicate: int = 1) -> torch.nn.Module:
    """With several processes, shard the model with FSDP2 (each transformer layer, then each flow block and the
    denoiser, then the root) over `device_mesh(procs, replicate)` (HSDP when `replicate` > 1), or wrap it in DDP
    without FSDP; one process trains the bare model.  bf16 parameters in compute with fp32 master weights and
    gradient reduction when `bf16`.  Returns what the training step calls (the model itself under FSDP)."""
    if fsdp and procs.world_size > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        # FSDP2 warns when a wrapped module returns a view (an in-place op on it would skip the all-gather hook):
        # ours do (MetaBlock.from_seq's .view, the text slice of the joint sequence, unpatchify), and nothing applies
        # an in-place op to a module's output, so the gradients are exact: tests/test_train.py checks that one FSDP
        # (and DDP) step on 2 processes equals the single-process step on the same global batch.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor",
                                category=UserWarning)

        mesh = device_mesh(procs, replicate)
        # Inputs stay as they are: the rotary tables must not be rounded to bf16 (autocast handles the matmuls).
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False) if bf16 else MixedPrecisionPolicy()
        for kind in (AttentionBlock, MetaBlock, NonCausalBlock):
            for module in list(model.modules()):
                if isinstance(module, kind):
                    fully_shard(module, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        for module in [model] + [b for b in model.blocks if isinstance(b, MetaBlock)]:
            register_fsdp_forward_method(module, "reverse")  # sampling calls reverse, not forward
        register_fsdp_forward_method(model, "denoise")
        return model
    if procs.world_size > 1:
        return torch.nn.parallel.DistributedDataParallel(Objective(model), find_unused_parameters=True)
    return model


def shard_frozen(module: torch.nn.Module, procs: Processes, replicate: int = 1) -> torch.nn.Module:
    """Shard a frozen module (the text encoder) with FSDP2 like the model: each entry of its layer lists, then the
    whole."""
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh(procs, replicate)
    for layers in [m for m in module.modules() if isinstance(m, torch.nn.ModuleList)]:
        for layer in layers:
            fully_shard(layer, mesh=mesh)
    return fully_shard(module, mesh=mesh)


class Objective(torch.nn.Module):
    """DDP wraps this so that both of the model's training calls, the flow (`forward`) and the learnable denoiser
    (`denoise`), pass through DDP's forward and get their gradients averaged."""

    def __init__(self, model: Model):
        super().__init__()
        self.model = model

    def forward(self, *args, denoise: bool = False):
        return self.model.denoise(*args) if denoise else self.model(*args)


def unwrap(model: torch.nn.Module) -> Model:
    return model.module.model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# ---- schedule and EMA ---------------------------------------------------------------------------------------------
def learning_rate(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up from min(min_lr, 1e-6) to lr over `warmup` steps, then cosine decay to min_lr at `total`."""
    if step < warmup:
        start = min(min_lr, 1e-6)
        return start + (step + 1) / warmup * (lr - start)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


class EMA:
    """Exponential moving average of the model's parameters (sharded like them under FSDP)."""

    def __init__(self, model: Model, decay: float):
        self.decay = decay
        self.params = {k: p.detach().clone().float() for k, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: Model):
        for k, p in model.named_parameters():
            self.params[k].lerp_(p.detach().float(), 1 - self.decay)

    def state_dict(self):
        return self.params

    @torch.no_grad()
    def copy_to(self, model: Model):
        for k, p in model.named_parameters():
            p.copy_(self.params[k])


# ---- checkpoints --------------------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint that does not exist or cannot be read: reported as one line."""


def checkpoint_step(path: Path) -> int | None:
    name = path.name
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def complete(path: Path) -> bool:
    """Whether a checkpoint folder holds what loading needs: DCP's .metadata and rank 0's own state."""
    return (path / ".metadata").is_file() and (path / "extra-rank00000.pt").is_file()


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in a folder: `step-<N>` (never a `.tmp` left by an interrupted save), with its
    files (a folder emptied or cut short some other way is passed over)."""
    found = [p for p in folder.glob("step-*") if p.is_dir() and checkpoint_step(p) is not None and complete(p)] \
        if folder.is_dir() else []
    return max(found, key=checkpoint_step) if found else None


class TrainState:
    """Everything a run continues from, saved and loaded whole by save_checkpoint / load_checkpoint (the Stateful
    pattern of torch.distributed.checkpoint and torchtitan).

    `state_dict()` is the distributed part, which DCP saves sharded: model, optimizers and EMA, named as in the bare
    model whatever wraps it, so that checkpoints move between single-process, DDP and FSDP runs.
    `local_state_dict()` is this rank's part: step, epoch, data position and every random state, with the model
    configuration and input flags (utils.config.RUN_KEYS) that sampling from a checkpoint folder reads, and every
    flag of the run (`flags`), to tell what changed when the run goes on.
    """

    def __init__(self, model, optimizers: list, ema: "EMA | None", loader, generator: torch.Generator,
                 device: torch.device, config: dict | None = None, run: dict | None = None,
                 flags: dict | None = None):
        self.model, self.optimizers, self.ema, self.loader = model, optimizers, ema, loader
        self.generator, self.device = generator, device
        self.config, self.run, self.flags = config or {}, run or {}, flags or {}
        self.step = self.epoch = 0
        self.changed: dict[str, tuple] = {}  # flags that differ from the loaded checkpoint's: name -> (then, now)

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(unwrap(self.model), self.optimizers)
        state = {"model": model_sd, "optim": optim_sd}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()  # its own tensors: DCP loads them in place
        return state

    def load_state_dict(self, state: dict):
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(unwrap(self.model), self.optimizers, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    def local_state_dict(self) -> dict:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {"step": self.step, "epoch": self.epoch, "loader": self.loader.state_dict(), "config": self.config,
                "run": self.run, "flags": self.flags, "rng": {"torch": torch.get_rng_state(), "generator": self.generator.get_state(),
                                         "cuda": cuda}}

    def load_local_state_dict(self, local: dict):
        self.step, self.epoch = local["step"], local["epoch"]
        torch.set_rng_state(local["rng"]["torch"])
        self.generator.set_state(local["rng"]["generator"])
        if local["rng"].get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(local["rng"]["cuda"], self.device)
        self.loader.load_state_dict(local["loader"])
        self.epoch = self.loader.epoch  # a finished epoch's end is the next one's start
        then = local.get("flags", {})
        self.changed = {k: (then[k], v) for k, v in self.flags.items() if k in then and then[k] != v}


def save_checkpoint(folder: Path, state: TrainState, procs: Processes, keep: int = 3) -> Path:
    """Write step-<state.step> atomically: the distributed part by DCP, this rank's part as extra-rank<N>.pt, into
    step-<N>.tmp, renamed once every rank has written.  Older checkpoints beyond the newest `keep` (0: keep all)
    and leftovers of interrupted saves are removed, only after the new one is complete.  A write that fails on any
    rank (a full disk) removes the partial folder and raises one CheckpointError on every rank; the previous
    checkpoints stay."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    final, tmp = folder / f"step-{state.step:08d}", folder / f"step-{state.step:08d}.tmp"
    if procs.main:
        for leftover in folder.glob("step-*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir(parents=True)
    procs.barrier()
    failure = None
    try:
        with quiet_dcp():
            dcp.save(state.state_dict(), checkpoint_id=str(tmp))
        torch.save(state.local_state_dict(), tmp / f"extra-rank{procs.rank:05d}.pt")
    except CheckpointException as err:  # DCP gathers each rank's error: report the first one itself
        failure = next((exc for exc, _ in err.failures.values()), err)
    except (OSError, RuntimeError) as err:
        failure = err
    if procs.all_min(0.0 if failure else 1.0) == 0.0:  # agreed, so that no rank waits for a failed one
        if procs.main:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = one_line(failure) if failure else "on another rank"
        raise CheckpointError(f"{final}: the checkpoint could not be written ({reason}); the previous checkpoints "
                              f"in {folder} are kept")
    if procs.main:
        old = final.with_name(final.name + ".old")  # a checkpoint of the same step is replaced, never lost first
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        done = sorted((p for p in folder.glob("step-*") if checkpoint_step(p) is not None), key=checkpoint_step)
        for stale in done[:-keep] if keep else []:
            shutil.rmtree(stale, ignore_errors=True)
    procs.barrier()
    return final


@contextlib.contextmanager
def quiet_dcp():
    """DCP logs the tracebacks of errors it then raises, and warns about single-process use: keep both to ourselves."""
    logger = logging.getLogger("torch.distributed.checkpoint")
    level, logger.level = logger.level, logging.CRITICAL
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            yield
    finally:
        logger.setLevel(level)


def load_checkpoint(path: Path, state: TrainState, procs: Processes):
    """Load a checkpoint written by save_checkpoint into `state`, in place.  Everything is read and checked before
    the model is touched; a bad checkpoint is one CheckpointError naming it."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if not path.is_dir() or not (path / ".metadata").is_file():
        raise CheckpointError(f"--resume_path {path}: not a checkpoint folder (expected step-<N> with .metadata)")
    written = len(list(path.glob("extra-rank*.pt")))  # the processes that wrote it
    # A rank the checkpoint has no file for (more processes now) takes rank 0's step, epoch and data position (all
    # ranks share them: batches are counted globally) and random streams of its own, below.
    local_file = path / f"extra-rank{procs.rank if procs.rank < written else 0:05d}.pt"
    if not local_file.is_file():
        raise CheckpointError(f"{path}: incomplete (no {local_file.name})")
    unreadable = lambda err: CheckpointError(f"{path}: cannot be loaded ({one_line(err)})")
    try:
        dcp.FileSystemReader(str(path)).read_metadata()
        local = torch.load(local_file, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated or foreign files: the path is what the user needs
        raise unreadable(err) from None
    then = local.get("config") or {}
    drift = [f"{k} {then[k]} -> {v}" for k, v in state.config.items()
             if k in then and then[k] != v and k not in TRAINING_ONLY_FIELDS]
    if drift:
        raise CheckpointError(f"{path} was written by a model of another architecture ({'; '.join(drift)}): go on "
                              f"with the flags it was written with, or start a new run in another --logdir")
    try:
        distributed = state.state_dict()
        with quiet_dcp():
            dcp.load(distributed, checkpoint_id=str(path))
    except Exception as err:
        raise unreadable(err) from None
    state.load_state_dict(distributed)
    state.load_local_state_dict(local)
    if procs.rank >= written:
        state.generator.manual_seed(int(torch.randint(2**62, (1,), generator=state.generator, device=state.generator.device)) + procs.rank)
    if written != procs.world_size and procs.main:
        print(f"note: {path} was written by {written} process(es), going on with {procs.world_size} (weights and "
              f"optimizer state resharded; the data goes on from the same global batch; each rank's noise stream "
              f"{'is new beyond rank ' + str(written - 1) if procs.world_size > written else 'is kept'})")


def export_weights(model, path: Path, procs: Processes, ema: EMA | None = None, run: dict | None = None,
                   dtype: torch.dtype | None = None):
    """Consolidated weights (the EMA's if given) in one file: safetensors with the model configuration and the `run`
    flags (utils.config.RUN_KEYS) in its metadata, or, for a `.pth` path, a plain state dict as the official code
    loads it.  `dtype` (e.g. torch.float16) stores floating-point tensors at that precision: half the bytes, and
    loading casts them back to the model's dtype.  Every rank takes part in gathering sharded tensors; rank 0 writes
    (atomically)."""
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    tensors = ema.params if ema is not None else unwrap(model).state_dict()
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().contiguous()
            for k, v in tensors.items()}
    if dtype is not None:
        full = {k: v.to(dtype) if v.is_floating_point() else v for k, v in full.items()}
    if procs.main:
        meta = {"config": json.dumps(dataclasses.asdict(unwrap(model).config)), "run": json.dumps(run or {})}
        tmp = path.with_name(path.name + ".tmp")
        try:
            if path.suffix == ".pth":
                torch.save(full, tmp)
            else:
                save_file(full, str(tmp), metadata=meta)
        except (OSError, RuntimeError) as err:  # a full disk: the previous file stays
            tmp.unlink(missing_ok=True)
            raise CheckpointError(f"{path}: the weights could not be written ({one_line(err)})") from None
        plain_mode(tmp)
        os.replace(tmp, path)
    procs.barrier()
