"""Fault-injection trials for `spo train` (issue 15): kill -9, two runs on one folder, damaged checkpoints.

Everything runs the real CLI (`python -m spo.cli train ...`) as subprocesses on the tiny embedded world
(`spo world build --tiny`, reused when already built) with a seconds-long SPO config that writes several
checkpoints per run (step checkpoints via log.checkpointing_steps at every resampler round, and one per epoch).

  kill -9       One uninterrupted reference run. Then per trial: start `spo train`, SIGKILL it at a moment
                drawn from a seeded RNG (a random time; the first checkpoint `.partial` folder seen after a
                random time; the LoRA export's `lora.partial`; just after a checkpoint's rename, while old
                ones are rotated out; or two kills in a row), then `--resume latest` (or, when it was killed
                before its first checkpoint, the same command with `--overwrite`, as the error message says)
                until it completes. The final LoRA must equal the reference's tensor by tensor, bit for bit.
  concurrency   Two `spo train` on one fresh folder started together, or the second while the first is
                loading / training (plain, with --overwrite, with --resume latest): exactly one runs, the
                other exits != 0 with one line naming the lock holder's pid; the finished folder's
                checkpoints verify, its LoRA equals the reference, and `--resume latest` on it exits 0.
                A lock left by a dead pid is taken over; a lock naming another host is refused and kept.
  corruption    Copies of the reference run (3 checkpoints): damage the newest (a flipped byte, a truncated
                file, a deleted manifest, a deleted weights file, a garbage manifest), the two newest, or all
                of them, then `--resume latest train.num_epochs=E+1`: the damaged ones are skipped with a
                line saying which and why, training continues from the newest intact one and must end with
                the LoRA of an uninterrupted E+1-epoch run; with nothing intact it must refuse in one line
                and change no file. Naming a damaged checkpoint (`--resume DIR`) must be refused.

    python benchmarks/reliability_trials.py                 # the committed results (8 min on 2 busy cores)
    python benchmarks/reliability_trials.py --quick --out /tmp/rel   # smoke test (1.5 min, world build included)

Writes reliability_trials.json and reliability_trials.md into --out (default benchmarks/results). The world
and the 1-step SPM are cached in --work (default: <tmp>/spo-reliability-trials); `--world DIR` reuses any
tiny world. Every subprocess runs with OMP_NUM_THREADS=1 (the same for the reference and the trials).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
           MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
SPO = [sys.executable, "-m", "spo.cli"]
LORA_FILE = "pytorch_lora_weights.safetensors"
KILL_KINDS = ("random", "checkpoint", "export", "random", "checkpoint", "rotation", "double", "random",
              "checkpoint", "export", "random", "double")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ setup


def ensure_world(work: Path, world: Path | None) -> tuple[Path, Path]:
    """The tiny world (built once into work/world unless --world) and a 1-step SPM trained on it."""
    if world is None:
        world = work / "world"
        if not (world / "world.json").is_file():
            shutil.rmtree(world, ignore_errors=True)
            log(f"building the tiny world in {world} (about 2 min)")
            run_checked([*SPO, "world", "build", "--tiny", "--out", str(world)])
    spm_run = work / "spm-run"
    if not (spm_run / "spm").is_dir():
        shutil.rmtree(spm_run, ignore_errors=True)
        log("training a 1-step SPM")
        run_checked([*SPO, "train-spm", f"data.dataset={world / 'preference'}", f"model.diffusion_model={world / 'sd'}",
                     f"model.base={world / 'pickscore'}", f"log.output_dir={spm_run}", "train.max_steps=1",
                     "train.batch_size=4", "log.report_to=none"])
    return world, spm_run / "spm"


def run_checked(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"setup command failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-3000:]}")


def train_args(world: Path, spm: Path, out: Path, epochs: int, quick: bool) -> list[str]:
    """A seconds-long run: 2 prompts per round, 3 optimizer steps per round, a step checkpoint every round."""
    return ["train", f"model.pretrained={world / 'sd'}", f"model.spm={spm}", "sample.num_steps=4",
            "sample.divert_start_step=1", "sample.batch_size=2", f"sample.batches_per_epoch={1 if quick else 2}",
            "sample.threshold=0", "train.batch_size=2", f"train.num_epochs={epochs}", "train.learning_rate=1e-2",
            "log.checkpointing_steps=3", "log.checkpoints_total_limit=3", f"log.output_dir={out}",
            "log.report_to=none"]


# ------------------------------------------------------------------------------------------ one process


class Launch:
    """One `spo train` subprocess, watched by polling its run folder; optionally SIGKILLed by a trigger."""

    def __init__(self, args: list[str], out: Path, logs: Path, label: str):
        self.out, self.args = out, args
        self.stderr_path = logs / f"{label}.stderr"
        self.stdout_path = logs / f"{label}.stdout"
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([*SPO, *args], stdout=open(self.stdout_path, "w"),
                                     stderr=open(self.stderr_path, "w"), env=ENV, cwd=ROOT, start_new_session=True)
        self.killed_at: float | None = None
        self.partials_seen = 0
        self._seen: set[str] = set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def partials(self) -> set[str]:
        """`.partial` folders present now: checkpoints/<name>.partial and lora.partial."""
        found = set()
        try:
            with os.scandir(self.out / "checkpoints") as it:
                found = {f"checkpoints/{e.name}" for e in it if e.name.endswith(".partial")}
        except OSError:
            pass
        if os.path.isdir(self.out / "lora.partial"):
            found.add("lora.partial")
        return found

    def complete_checkpoints(self) -> set[str]:
        try:
            with os.scandir(self.out / "checkpoints") as it:
                return {e.name for e in it if not e.name.endswith(".partial")}
        except OSError:
            return set()

    def run(self, trigger: dict | None, timeout: float) -> bool:
        """Wait for the process; SIGKILL it when `trigger` fires. True when it was killed."""
        kind = (trigger or {}).get("kind")
        after = (trigger or {}).get("after", 0.0)
        before = self.complete_checkpoints()
        fire_at = None
        while self.proc.poll() is None:
            now = self.elapsed()
            if now > timeout:
                self.kill()
                raise TimeoutError(f"{shlex.join(self.args[:1])} ran past {timeout:.0f}s")
            fire = False
            if kind == "time":
                fire = now >= trigger["at"]
            elif kind in ("checkpoint", "export"):
                present = self.partials()
                fresh = present - self._seen
                self._seen |= present
                self.partials_seen += len(fresh)
                if kind == "checkpoint":
                    fire = now >= after and any(p.startswith("checkpoints/") for p in present)
                else:
                    fire = "lora.partial" in present
            elif kind == "rotation":
                done = self.complete_checkpoints()
                fire = now >= after and bool(done - before)
                if now < after:
                    before = done
            if fire and fire_at is None:
                fire_at = now + (trigger or {}).get("delay", 0.0)  # a little way into the write, or at once
            if fire_at is not None and now >= fire_at:
                self.kill()
                return True
            time.sleep(0.001 if kind in ("checkpoint", "export", "rotation") else 0.01)
        return False

    def kill(self) -> None:
        self.killed_at = self.elapsed()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    @property
    def rc(self) -> int:
        return self.proc.returncode

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def message_lines(stderr: str) -> list[str]:
    """stderr without progress bars (tqdm redraws with \\r): the lines a user reads."""
    lines = []
    for line in stderr.splitlines():
        line = line.split("\r")[-1].strip()
        if line and not line.startswith(("Loading ", "Writing model shards", "spo:", "Fetching")):
            lines.append(line)
    return lines


def describe_kill(out: Path) -> dict:
    """What the killed process left behind: the half-written folder (and what it holds), the newest checkpoint."""
    partial = sorted(str(p.relative_to(out)) for p in [*(out / "checkpoints").glob("*.partial"), out / "lora.partial"]
                     if p.is_dir())
    contents = {p: sorted(f.name for f in (out / p).iterdir()) for p in partial}
    ckpts = sorted((p.name for p in (out / "checkpoints").glob("*") if p.is_dir() and not p.name.endswith(".partial")),
                   key=lambda n: tuple(int(x) for x in "".join(c if c.isdigit() else " " for c in n).split()))
    if partial:
        what = "; ".join(f"writing {p} ({len(contents[p])} files so far" + ("" if "manifest.json" not in contents[p]
                                                                        else ", manifest written") + ")"
                         for p in partial)
    elif (out / "lora").is_dir():
        what = "after the LoRA export (plots / exit)"
    elif ckpts:
        what = f"training (newest checkpoint {ckpts[-1]})"
    elif (out / "run.json").is_file():
        what = "training, before the first checkpoint"
    else:
        what = "startup (imports / model loading)"
    return dict(what=what, partial=contents, checkpoints=ckpts, lock_left=(out / ".spo.lock").is_file())


# ------------------------------------------------------------------------------------------ comparisons


def compare_lora(a: Path, b: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    if not (a / LORA_FILE).is_file() or not (b / LORA_FILE).is_file():
        return dict(identical=False, max_abs_diff=None, note="LoRA file missing")
    x, y = load_file(str(a / LORA_FILE)), load_file(str(b / LORA_FILE))
    if set(x) != set(y):
        return dict(identical=False, max_abs_diff=None, note=f"tensor names differ ({len(x)} vs {len(y)})")
    diff, same = 0.0, True
    for k in x:
        same &= x[k].dtype == y[k].dtype and x[k].shape == y[k].shape and torch.equal(x[k], y[k])
        if x[k].shape == y[k].shape:
            diff = max(diff, (x[k].double() - y[k].double()).abs().max().item())
    ha, hb = safetensors_parts(a / LORA_FILE), safetensors_parts(b / LORA_FILE)
    return dict(identical=bool(same), max_abs_diff=diff, tensors=len(x),
                same_file_bytes=sha256(a / LORA_FILE) == sha256(b / LORA_FILE),
                same_header_and_data=ha == hb)  # the file bytes up to the order of the header's JSON keys


def safetensors_parts(path: Path) -> tuple[dict, str]:
    """A safetensors file as (its parsed JSON header, sha256 of its tensor bytes)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), hashlib.sha256(raw[8 + n:]).hexdigest()


def losses(out: Path) -> list[float]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoints_intact(out: Path) -> dict[str, str | None]:
    from spo.runtime import numbered, verify_manifest

    return {p.name: verify_manifest(p) for p in numbered(out, "epoch")}


# ------------------------------------------------------------------------------------------ trials


class Trials:
    def __init__(self, a):
        self.a, self.quick = a, a.quick
        self.rng = random.Random(a.seed)
        self.work = a.work
        self.epochs = 2 if a.quick else 3
        self.timeout = 900.0

    def args(self, out: Path, epochs: int | None = None) -> list[str]:
        return train_args(self.world, self.spm, out, epochs or self.epochs, self.quick)

    def fresh(self, name: str) -> tuple[Path, Path]:
        out, logs = self.work / "runs" / name, self.work / "logs" / name
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir(parents=True)
        return out, logs

    def reference(self, name: str, epochs: int) -> tuple[Path, float, int]:
        out, logs = self.fresh(name)
        run = Launch(self.args(out, epochs), out, logs, "run")
        run.run(None, self.timeout)
        if run.rc != 0:
            sys.exit(f"reference run failed ({run.rc}):\n{run.stderr()[-3000:]}")
        return out, run.elapsed(), len(losses(out))

    # -------------------------------------------------------------- kill -9

    def kill_plan(self, kind: str) -> list[dict]:
        T, r = self.t_ref, self.rng
        if kind == "random":
            return [dict(kind="time", at=round(r.uniform(0.05, 0.97) * T, 2))]
        if kind == "checkpoint":
            return [dict(kind="checkpoint", after=round(r.uniform(0.0, 0.85) * T, 2), delay=round(r.uniform(0, 0.005), 4))]
        if kind == "export":
            return [dict(kind="export", delay=round(r.uniform(0, 0.01), 4))]
        if kind == "rotation":
            return [dict(kind="rotation", after=round(r.uniform(0.2, 0.85) * T, 2))]
        if kind == "double":  # mid-checkpoint, then again in the resumed process at a random time
            return [dict(kind="checkpoint", after=round(r.uniform(0.0, 0.7) * T, 2), delay=round(r.uniform(0, 0.005), 4)),
                    dict(kind="time", at=round(r.uniform(0.2, 0.7) * T, 2))]
        raise ValueError(kind)

    def kill_trial(self, i: int, kind: str) -> dict:
        for attempt in range(3):
            plan = self.kill_plan(kind)
            out, logs = self.fresh(f"kill-{i:02d}")
            record = dict(trial=i, kind=kind, attempt=attempt + 1, plan=plan, kills=[], launches=[], problems=[])
            launches, resume, killed_first = 0, False, False
            while True:
                trigger = plan[launches] if launches < len(plan) else None
                args = self.args(out) + (["--resume", "latest"] if resume else [])
                if launches and not resume:
                    args.append("--overwrite")
                run = Launch(args, out, logs, f"launch-{launches}")
                killed = run.run(trigger, self.timeout)
                err = run.stderr()
                lines = message_lines(err)
                record["launches"].append(dict(args=" ".join(args[-3:]) if launches else "fresh", rc=run.rc,
                                               seconds=round(run.elapsed(), 2), killed=killed,
                                               notes=(["started again with --overwrite (killed before its first "
                                                       "checkpoint)"] if launches and not resume else [])
                                               + [l for l in lines if l.startswith(("[lock]", "[resume]", "error"))
                                                  or "resumed from" in l]))
                if "Traceback" in err:
                    record["problems"].append(f"traceback in launch {launches}: {lines[-1] if lines else ''}")
                launches += 1
                if killed:
                    info = describe_kill(out)
                    record["kills"].append(dict(launch=launches - 1, seconds=round(run.killed_at, 3),
                                                trigger=trigger["kind"], **info))
                    killed_first |= launches == 1
                    # what the user would do next: --resume latest, or start again when no checkpoint was written
                    from spo.runtime import numbered

                    resume = bool(numbered(out, "epoch"))
                    if launches > 8:
                        record["problems"].append("more than 8 launches")
                        break
                    continue
                if run.rc != 0:
                    if launches == 1 and not resume:
                        record["problems"].append(f"the first run failed (rc {run.rc}): {lines[-1:]}")
                    else:
                        record["problems"].append(f"launch {launches - 1} exited {run.rc}: {lines[-1:]}")
                break
            if not killed_first and not record["problems"]:
                log(f"  kill trial {i} ({kind}): finished before the kill fired; drawing again")
                continue
            break
        cmp = compare_lora(self.ref, out / "lora")
        record.update(resumes=sum(1 for l in record["launches"][1:]), identical=cmp["identical"],
                      max_abs_diff=cmp["max_abs_diff"], same_file_bytes=cmp.get("same_file_bytes"),
                      same_header_and_data=cmp.get("same_header_and_data"),
                      metrics_losses_identical=losses(out) == losses(self.ref_dir),
                      lock_left=(out / ".spo.lock").exists(), killed=killed_first)
        if cmp.get("note"):
            record["problems"].append(cmp["note"])
        record["handled"] = bool(record["killed"] and record["identical"] and not record["problems"]
                                 and record["launches"][-1]["rc"] == 0 and not record["lock_left"])
        k = record["kills"][0] if record["kills"] else {}
        log(f"  kill trial {i} ({kind}): killed at {k.get('seconds')}s ({k.get('what')}); "
            f"{record['resumes']} relaunches; identical={record['identical']} max|diff|={record['max_abs_diff']}"
            + (f"; problems: {record['problems']}" if record["problems"] else ""))
        return record

    # -------------------------------------------------------------- two runs, one folder

    def concurrency_trial(self, mode: str) -> dict:
        out, logs = self.fresh(f"concurrency-{mode}")
        record = dict(trial=mode, problems=[])
        second_args = self.args(out)
        first = Launch(self.args(out), out, logs, "first")
        if mode == "simultaneous":
            pass
        elif mode == "second-while-loading":
            while not (out / ".spo.lock").exists() and first.proc.poll() is None:
                time.sleep(0.005)
        elif mode in ("overwrite-while-training", "resume-while-training"):
            while not first.complete_checkpoints() and first.proc.poll() is None:
                time.sleep(0.01)
            second_args += ["--overwrite"] if mode.startswith("overwrite") else ["--resume", "latest"]
        started = first.elapsed()
        second = Launch(second_args, out, logs, "second")
        record["second_started_after_s"] = round(started, 2)
        for run in (first, second):
            run.run(None, self.timeout)
        runs = {"first": first, "second": second}
        winners = [n for n, r in runs.items() if r.rc == 0]
        losers = [n for n, r in runs.items() if r.rc != 0]
        record.update(exit_codes={n: r.rc for n, r in runs.items()}, winner=winners[0] if len(winners) == 1 else None)
        if len(winners) != 1:
            record["problems"].append(f"{len(winners)} runs exited 0")
        for n, r in runs.items():
            if "Traceback" in r.stderr():
                record["problems"].append(f"traceback in the {n} run")
        if len(winners) == 1 and len(losers) == 1:
            win, lose = runs[winners[0]], runs[losers[0]]
            lines = message_lines(lose.stderr())
            record["refusal"] = lines[-1] if lines else ""
            record["refusal_lines"] = len([l for l in lines if l.startswith("error")])  # besides warnings
            want = f"in use by pid {win.pid} on {socket.gethostname()}"
            if want not in record["refusal"]:
                record["problems"].append(f"refusal does not name the holder ({want!r})")
            if record["refusal_lines"] != 1:
                record["problems"].append(f"refusal has {record['refusal_lines']} lines")
            record.update(self.check_finished_folder(out, logs))
        record["handled"] = not record["problems"]
        log(f"  concurrency {mode}: exit codes {record['exit_codes']}; {record.get('refusal', '')[:110]}"
            + (f"; problems: {record['problems']}" if record["problems"] else ""))
        return record

    def check_finished_folder(self, out: Path, logs: Path) -> dict:
        """The surviving run: checkpoints verify, LoRA = reference, no lock left, `--resume latest` exits 0."""
        problems = []
        intact = checkpoints_intact(out)
        if any(v is not None for v in intact.values()) or not intact:
            problems.append(f"checkpoints not intact: {intact}")
        cmp = compare_lora(self.ref, out / "lora")
        if not cmp["identical"]:
            problems.append(f"LoRA differs from the reference (max |diff| {cmp['max_abs_diff']})")
        if (out / ".spo.lock").exists():
            problems.append("lock file left behind")
        again = Launch(self.args(out) + ["--resume", "latest"], out, logs, "resume-after")
        again.run(None, self.timeout)
        if again.rc != 0 or "Traceback" in again.stderr():
            problems.append(f"--resume latest on the finished folder exited {again.rc}")
        if not compare_lora(self.ref, out / "lora")["identical"]:
            problems.append("LoRA changed after --resume latest")
        return dict(problems_after=problems, checkpoints=sorted(intact), lora_identical=cmp["identical"],
                    resume_after_rc=again.rc) | ({"problems": problems} if problems else {})

    def stale_lock_trial(self) -> dict:
        """A lock from a dead pid on this host (a killed run) is taken over; the run continues and finishes."""
        out, logs = self.fresh("stale-lock")
        shutil.copytree(self.ref_dir, out, dirs_exist_ok=True)
        shutil.rmtree(out / "lora")
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (out / ".spo.lock").write_text(json.dumps(dict(pid=dead.pid, host=socket.gethostname(), started="earlier")))
        run = Launch(self.args(out) + ["--resume", "latest"], out, logs, "run")
        run.run(None, self.timeout)
        notes = [l for l in message_lines(run.stderr()) if l.startswith("[lock]")]
        cmp = compare_lora(self.ref, out / "lora")
        problems = [] if run.rc == 0 else [f"exited {run.rc}"]
        if not any(f"pid {dead.pid}, no longer running" in n for n in notes):
            problems.append("no takeover message")
        if not cmp["identical"]:
            problems.append("LoRA differs from the reference")
        if (out / ".spo.lock").exists():
            problems.append("lock file left behind")
        log(f"  stale lock: rc {run.rc}; {notes[:1]}")
        return dict(trial="stale-lock (dead pid, this host)", rc=run.rc, message=notes[0] if notes else "",
                    lora_identical=cmp["identical"], problems=problems, handled=not problems)

    def foreign_lock_trial(self) -> dict:
        """A lock naming another host is never taken over (we cannot tell whether that run is alive)."""
        out, logs = self.fresh("foreign-lock")
        shutil.copytree(self.ref_dir, out, dirs_exist_ok=True)
        lock = json.dumps(dict(pid=4242, host="some-other-host", started="earlier"))
        (out / ".spo.lock").write_text(lock)
        before = tree_hashes(out)
        run = Launch(self.args(out) + ["--resume", "latest"], out, logs, "run")
        run.run(None, self.timeout)
        lines = message_lines(run.stderr())
        problems = [] if run.rc != 0 else ["exited 0"]
        if not lines or "in use by pid 4242 on some-other-host" not in lines[-1]:
            problems.append("refusal does not name the holder")
        if "Traceback" in run.stderr():
            problems.append("traceback")
        if tree_hashes(out) != before:
            problems.append("files changed")
        log(f"  foreign lock: rc {run.rc}; {lines[-1:] }")
        return dict(trial="lock held on another host", rc=run.rc, message=lines[-1] if lines else "",
                    files_unchanged=tree_hashes(out) == before, problems=problems, handled=not problems)

    # -------------------------------------------------------------- damaged checkpoints

    @staticmethod
    def damage(ckpt: Path, how: str) -> str:
        if how == "flip a byte in trainable.safetensors":
            f = ckpt / "trainable.safetensors"
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0xFF
            f.write_bytes(bytes(data))
        elif how == "truncate optimizer.pt to half":
            f = ckpt / "optimizer.pt"
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        elif how == "delete manifest.json":
            (ckpt / "manifest.json").unlink()
        elif how == "delete trainable.safetensors":
            (ckpt / "trainable.safetensors").unlink()
        elif how == "garbage manifest.json":
            (ckpt / "manifest.json").write_bytes(os.urandom(64))
        else:
            raise ValueError(how)
        return how

    def corruption_trial(self, name: str, damages: list[str], named: bool = False) -> dict:
        """`damages[i]` is applied to the i-th newest checkpoint; then resume with one more epoch."""
        from spo.runtime import numbered

        out, logs = self.fresh(f"corrupt-{name}")
        shutil.copytree(self.ref_dir, out, dirs_exist_ok=True)
        ckpts = numbered(out, "epoch")
        damaged = []
        for ckpt, how in zip(reversed(ckpts), damages):
            self.damage(ckpt, how)
            damaged.append(ckpt.name)
        intact = [c.name for c in ckpts if c.name not in damaged]
        before = tree_hashes(out)
        where = str(ckpts[-1]) if named else "latest"
        run = Launch(self.args(out, self.epochs + 1) + ["--resume", where], out, logs, "resume")
        run.run(None, self.timeout)
        lines = message_lines(run.stderr())
        skips = [l for l in lines if l.startswith("[resume] skipping")]
        resumed = [l for l in lines if "resumed from" in l]
        record = dict(trial=name, damage=dict(zip(damaged, damages)), resume=where if named else "latest",
                      rc=run.rc, skipped=skips, resumed_from=resumed[0] if resumed else "", problems=[])
        if "Traceback" in run.stderr():
            record["problems"].append("traceback")
        if intact and not named:
            if run.rc != 0:
                record["problems"].append(f"exited {run.rc}: {lines[-1:]}")
            for ckpt in damaged:
                if not any(f"skipping checkpoint {ckpt}:" in s for s in skips):
                    record["problems"].append(f"no skip line for {ckpt}")
            if not resumed or not resumed[0].split(" (epoch")[0].endswith("/" + intact[-1]):
                record["problems"].append(f"did not resume from {intact[-1]}")
            cmp = compare_lora(self.ref_plus, out / "lora")
            record.update(identical_to_uninterrupted=cmp["identical"], max_abs_diff=cmp["max_abs_diff"],
                          metrics_losses_identical=losses(out) == losses(self.ref_plus_dir))
            if not cmp["identical"]:
                record["problems"].append("final LoRA differs from the uninterrupted run")
            after = checkpoints_intact(out)
            record["checkpoints_after"] = {k: v or "intact" for k, v in after.items()}
            if any(v is not None for v in after.values()):
                record["problems"].append("a damaged checkpoint survived the run")
        else:  # nothing intact, or the damaged one named: refuse in one line, change nothing
            record["refusal"] = lines[-1] if lines else ""
            if run.rc == 0:
                record["problems"].append("exited 0")
            want = "cannot resume from" if named else "no intact checkpoint"
            if want not in record["refusal"]:
                record["problems"].append(f"refusal lacks {want!r}")
            record["files_unchanged"] = tree_hashes(out) == before
            if not record["files_unchanged"]:
                record["problems"].append("files changed")
        record["handled"] = not record["problems"]
        log(f"  corruption {name}: rc {run.rc}; {skips or record.get('refusal', '')}; "
            f"{record['resumed_from'][:90]}" + (f"; problems: {record['problems']}" if record["problems"] else ""))
        return record

    # -------------------------------------------------------------- all

    def run(self) -> dict:
        a = self.a
        self.world, self.spm = ensure_world(self.work, a.world)
        t_start = time.time()
        log("reference runs")
        self.ref_dir, self.t_ref, _ = self.reference("reference", self.epochs)
        self.ref = self.ref_dir / "lora"
        self.ref_plus_dir, t_plus, _ = self.reference("reference-plus-one-epoch", self.epochs + 1)
        self.ref_plus = self.ref_plus_dir / "lora"
        log(f"  reference {self.epochs} epochs: {self.t_ref:.1f}s, checkpoints {sorted(checkpoints_intact(self.ref_dir))}")

        n_kill = a.kill_trials if a.kill_trials is not None else (2 if self.quick else 24)
        log(f"kill -9 trials ({n_kill})")
        kinds = ["checkpoint", "export"] if self.quick else [KILL_KINDS[i % len(KILL_KINDS)] for i in range(n_kill)]
        kill = [self.kill_trial(i + 1, kinds[i % len(kinds)]) for i in range(n_kill)]

        log("concurrency trials")
        modes = ["simultaneous"] if self.quick else ["simultaneous", "second-while-loading",
                                                       "overwrite-while-training", "resume-while-training"]
        concurrency = [self.concurrency_trial(m) for m in modes] + [self.stale_lock_trial(), self.foreign_lock_trial()]

        log("corruption trials")
        cases = [("flipped-byte", ["flip a byte in trainable.safetensors"])]
        if not self.quick:
            cases += [("truncated-file", ["truncate optimizer.pt to half"]),
                      ("manifest-deleted", ["delete manifest.json"]),
                      ("weights-deleted", ["delete trainable.safetensors"]),
                      ("manifest-garbage", ["garbage manifest.json"]),
                      ("two-newest-damaged", ["flip a byte in trainable.safetensors", "delete manifest.json"]),
                      ("all-damaged", ["flip a byte in trainable.safetensors", "truncate optimizer.pt to half",
                                       "delete trainable.safetensors"])]
        corruption = [self.corruption_trial(n, d) for n, d in cases]
        if not self.quick:
            corruption.append(self.corruption_trial("named-damaged", ["flip a byte in trainable.safetensors"], named=True))

        count = lambda rows: dict(tried=len(rows), handled=sum(r["handled"] for r in rows))  # noqa: E731
        return dict(
            command=shlex.join([sys.executable.split("/")[-1], *sys.argv]), date=time.strftime("%Y-%m-%d %H:%M"),
            machine=machine(), git=git_state(), quick=self.quick, seed=a.seed,
            config=" ".join(self.args(Path("OUT"))[1:]), reference_seconds=round(self.t_ref, 1),
            reference_plus_seconds=round(t_plus, 1), total_minutes=round((time.time() - t_start) / 60, 1),
            counts=dict(kill=count(kill) | dict(identical=sum(r["identical"] for r in kill),
                                                killed_mid_write=sum(any(k["partial"] for k in r["kills"]) for r in kill)),
                        concurrency=count(concurrency), corruption=count(corruption)),
            kill=kill, concurrency=concurrency, corruption=corruption)


def machine() -> dict:
    import torch

    return dict(host_cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), python=platform.python_version(),
                torch=torch.__version__, system=f"{platform.system()} {platform.release()}",
                load_average=[round(x, 2) for x in os.getloadavg()], threads_per_run=ENV["OMP_NUM_THREADS"])


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        return head + (" (uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


# ------------------------------------------------------------------------------------------ report


def short_note(line: str) -> str:
    if "took over a stale lock" in line:
        return "stale lock taken over"
    return line[:90]


def report(res: dict) -> str:
    c = res["counts"]
    L = [f"# Reliability trials{' (quick: smoke test, not for quoting)' if res['quick'] else ''}", "",
         f"`{res['command']}` on {res['date']}; {res['machine']['cores']} cores ({res['machine']['system']}, "
         f"python {res['machine']['python']}, torch {res['machine']['torch']}, load average "
         f"{res['machine']['load_average']}), git {res['git']}; seed {res['seed']}; {res['total_minutes']} min.", "",
         f"Training config (every run, `OMP_NUM_THREADS=1`): `spo train {res['config']}` "
         f"(reference run {res['reference_seconds']} s wall, most of it process start-up and model loading).", "",
         "| trials | tried | handled |", "|---|---|---|",
         f"| kill -9 then `--resume latest` (bit-identical LoRA) | {c['kill']['tried']} | {c['kill']['handled']} "
         f"(identical {c['kill']['identical']}/{c['kill']['tried']}; {c['kill']['killed_mid_write']} killed mid-write) |",
         f"| two runs / stale and foreign locks on one folder | {c['concurrency']['tried']} | {c['concurrency']['handled']} |",
         f"| damaged checkpoints | {c['corruption']['tried']} | {c['corruption']['handled']} |", "",
         "## kill -9", "",
         "| # | trigger | killed at (s) | what was being written | relaunches | notes on relaunch | identical | max abs diff | metrics identical |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r in res["kill"]:
        kills = "; ".join(f"{k['seconds']:.2f}" for k in r["kills"])
        what = "; ".join(k["what"] for k in r["kills"])
        notes = "; ".join(sorted({short_note(n) for l in r["launches"][1:] for n in l["notes"] if "resumed from" not in n}))
        L.append(f"| {r['trial']} | {r['kind']} | {kills} | {what} | {r['resumes']} | {notes or '-'} | "
                 f"{'yes' if r['identical'] else '**no**'} | {r['max_abs_diff']} | {'yes' if r['metrics_losses_identical'] else 'no'} |")
    same = sum(bool(r.get("same_file_bytes")) for r in res["kill"])
    parts = sum(bool(r.get("same_header_and_data")) for r in res["kill"])
    L += ["", f"Whole LoRA files byte-identical to the reference's: {same}/{len(res['kill'])}; same parsed header "
          f"and same tensor bytes: {parts}/{len(res['kill'])} (safetensors may write the header's metadata keys in "
          "another order from one process to the next)."]
    L += ["", "Triggers: `random` = SIGKILL at a uniform random time of the reference run's wall time; `checkpoint` = "
          "0-5 ms after the first checkpoint `.partial` folder seen after a random time; `export` = 0-10 ms "
          "after `lora.partial` appears; `rotation` = right after a checkpoint's rename (while old ones are rotated out); `double` = "
          "mid-checkpoint, then the resumed process again at a random time. A run killed before its first "
          "checkpoint is started again with `--overwrite` (what `--resume latest` then says to do).", "",
          "## Two runs, one folder", "",
          "| trial | exit codes | message of the refused run (or of the run) | handled |", "|---|---|---|---|"]
    for r in res["concurrency"]:
        codes = r.get("exit_codes") or r.get("rc")
        msg = r.get("refusal") or r.get("message", "")
        L.append(f"| {r['trial']} | {codes} | `{msg}` | {'yes' if r['handled'] else '**no**: ' + '; '.join(r['problems'])} |")
    L += ["", "After each two-run trial the surviving folder's checkpoints verify against their manifests, its LoRA "
          "is bit-identical to the reference run's, and `--resume latest` on it exits 0.", "",
          "## Damaged checkpoints", "",
          "| trial | damage (checkpoint: what) | exit | message(s) | resumed from | identical to uninterrupted | handled |",
          "|---|---|---|---|---|---|---|"]
    for r in res["corruption"]:
        damage = "; ".join(f"{k}: {v}" for k, v in r["damage"].items())
        msgs = "<br>".join(f"`{s}`" for s in [*r["skipped"], *([r["refusal"]] if r.get("refusal") else [])])
        frm = r["resumed_from"].split(" resumed from ")[-1].split(" (")[0].split("/")[-1] if r["resumed_from"] else "-"
        ident = {True: "yes", False: "**no**", None: "-"}[r.get("identical_to_uninterrupted")]
        L.append(f"| {r['trial']} | {damage} | {r['rc']} | {msgs} | {frm} | {ident} | "
                 f"{'yes' if r['handled'] else '**no**: ' + '; '.join(r['problems'])} |")
    return "\n".join(L) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 2 kill trials, 1 two-run trial, 1 corruption")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where the .json/.md go")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "spo-reliability-trials",
                   help="scratch folder: the cached world and SPM, the trial runs and their logs")
    p.add_argument("--world", type=Path, default=None, help="reuse this tiny world (spo world build --tiny)")
    p.add_argument("--kill-trials", type=int, default=None, help="number of kill -9 trials (default 24; quick 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    a = p.parse_args()
    a.work = a.work.resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    res = Trials(a).run()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "reliability_trials.json").write_text(json.dumps(res, indent=1) + "\n")
    (a.out / "reliability_trials.md").write_text(report(res))
    c = res["counts"]
    log(f"kill {c['kill']['handled']}/{c['kill']['tried']} (identical {c['kill']['identical']}), concurrency "
        f"{c['concurrency']['handled']}/{c['concurrency']['tried']}, corruption "
        f"{c['corruption']['handled']}/{c['corruption']['tried']}; wrote {a.out / 'reliability_trials.md'}")
    sys.exit(0 if all(v["handled"] == v["tried"] for v in c.values()) else 1)


if __name__ == "__main__":
    main()
