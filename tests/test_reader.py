"""The training reader and the validation iterator: form, round trip, splitting, exact resume."""

from __future__ import annotations

import io
import itertools
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import encoded_bytes, random_image

from mdt.data.encode import EncodeConfig, encode_dataset
from mdt.data.manifest import read_manifest
from mdt.data.reader import LatentLoader, iter_validation_batches, sample_latents
from mdt.errors import UserError

UNIQUE_IMAGES = 12


@pytest.fixture(scope="module")
def unique_labels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 images, each its own class (so a label names a sample), as pixels, 4 even shards of 3."""
    root = tmp_path_factory.mktemp("unique")
    rng = np.random.default_rng(3)
    for i in range(UNIQUE_IMAGES):
        (root / "images" / f"class{i:02d}").mkdir(parents=True)
        image = random_image(rng, (20, 16), "RGB")
        (root / "images" / f"class{i:02d}" / "x.png").write_bytes(encoded_bytes(image, "PNG"))
    out = root / "out"
    encode_dataset(EncodeConfig(str(root / "images"), str(out), resolution=8, vae="pixel", shard_size=3,
                                workers=0, progress=False))  # fmt: skip
    return out


def take(loader: LatentLoader, n: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(iter(loader), n))


def test_batches_have_the_promised_form(encoded_flip: Path) -> None:
    loader = LatentLoader(encoded_flip, 4, seed=0, num_workers=0)
    batch = next(iter(loader))
    assert batch["latents"].shape == (4, 4, 8, 8)
    assert batch["latents"].dtype == torch.float32
    assert batch["labels"].shape == (4,)
    assert batch["labels"].dtype == torch.int64
    assert ((batch["labels"] >= 0) & (batch["labels"] < 3)).all()
    assert batch["sample_ids"].dtype == torch.int64
    assert len(set(batch["sample_ids"].tolist())) == 4
    assert (loader.latent_shape, loader.num_classes, loader.steps_per_epoch) == ((4, 8, 8), 3, 2)


def test_sample_latents_draws_posterior_samples_of_a_random_view() -> None:
    moments = np.zeros((4000, 2, 2, 4, 8, 8), dtype=np.float16)
    moments[:, 1, 0] = 100.0  # the flipped view's mean, far from the original's
    moments[:, :, 1] = 2.0  # std
    scale, shift = 0.5, 0.25
    z = sample_latents(moments, scale, shift, torch.Generator().manual_seed(0)) / scale + shift
    assert z.dtype == torch.float32
    assert z.shape == (4000, 4, 8, 8)
    flipped = z.mean(dim=(1, 2, 3)) > 50
    assert 0.45 < flipped.float().mean() < 0.55
    residual = torch.where(flipped[:, None, None, None], z - 100.0, z) / 2.0
    assert abs(residual.mean().item()) < 0.01
    assert abs(residual.std().item() - 1) < 0.01
    again = sample_latents(moments, scale, shift, torch.Generator().manual_seed(0))
    assert torch.equal(again, sample_latents(moments, scale, shift, torch.Generator().manual_seed(0)))
    # Validation: the original view only; pixel data (mean only): no noise at all.
    original = sample_latents(moments, scale, shift, torch.Generator(), random_view=False) / scale + shift
    assert original.abs().max() < 20
    pixels = np.full((3, 1, 1, 3, 4, 4), 0.5, dtype=np.float16)
    assert torch.equal(sample_latents(pixels, 1.0, 0.0, torch.Generator()), torch.full((3, 3, 4, 4), 0.5))


def test_round_trip_returns_each_stored_sample_once_per_epoch(unique_labels: Path) -> None:
    stored = {}
    for batch in iter_validation_batches(unique_labels, 5):
        for latent, label in zip(batch["latents"], batch["labels"], strict=True):
            stored[int(label)] = latent
    assert sorted(stored) == list(range(UNIQUE_IMAGES))
    loader = LatentLoader(unique_labels, 3, seed=7, num_workers=0)
    epoch = take(loader, loader.steps_per_epoch)
    labels = torch.cat([b["labels"] for b in epoch]).tolist()
    assert sorted(labels) == list(range(UNIQUE_IMAGES))
    assert labels != sorted(labels)  # all, shuffled
    for batch in epoch:  # pixel data: the latent is the stored crop itself
        for latent, label in zip(batch["latents"], batch["labels"], strict=True):
            assert torch.equal(latent, stored[int(label)])


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_split_an_epoch_without_duplicates(unique_labels: Path, workers: int) -> None:
    seen = []
    for rank in range(2):
        loader = LatentLoader(unique_labels, 3, seed=1, rank=rank, world_size=2, num_workers=workers)
        assert loader.steps_per_epoch == 2
        seen += torch.cat([b["labels"] for b in take(loader, 2)]).tolist()
    assert sorted(seen) == list(range(UNIQUE_IMAGES))


@pytest.mark.parametrize("workers", [0, 2])
def test_start_step_resumes_bitwise(encoded_flip: Path, workers: int) -> None:
    def run(start: int, n: int) -> list[dict[str, torch.Tensor]]:
        return take(LatentLoader(encoded_flip, 3, seed=5, num_workers=workers, start_step=start), n)

    full = run(0, 9)  # 3 batches per epoch: crosses two epoch boundaries
    for start in (1, 3, 5):
        resumed = run(start, 9 - start)
        for a, b in zip(full[start:], resumed, strict=True):
            assert torch.equal(a["latents"], b["latents"])
            assert torch.equal(a["labels"], b["labels"])
    assert not torch.equal(full[0]["latents"], full[3]["latents"])
    other_seed = take(LatentLoader(encoded_flip, 3, seed=6, num_workers=workers), 1)[0]
    assert not torch.equal(other_seed["latents"], full[0]["latents"])


@pytest.fixture(scope="module")
def counted(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """48 samples, one class each (a label names its sample), as pixels: in 8 even shards of 6,
    and in 10 uneven shards (9 of 5 and one of 3)."""
    root = tmp_path_factory.mktemp("counted")
    rng = np.random.default_rng(4)
    for i in range(48):
        (root / "images" / f"c{i:02d}").mkdir(parents=True)
        (root / "images" / f"c{i:02d}" / "x.png").write_bytes(encoded_bytes(random_image(rng, (8, 8), "RGB"), "PNG"))
    out = {}
    for shard_size in (6, 5):
        out[shard_size] = root / f"out-{shard_size}"
        encode_dataset(EncodeConfig(str(root / "images"), str(out[shard_size]), resolution=8, vae="pixel",
                                    shard_size=shard_size, workers=0, progress=False))  # fmt: skip
    return out


@pytest.mark.parametrize("shard_size", [6, 5])
@pytest.mark.parametrize(("world", "batch"), [(1, 5), (1, 2), (2, 5), (3, 2), (4, 2), (4, 5), (5, 3)])
def test_each_epoch_visits_every_sample_once(counted: dict[int, Path], shard_size: int, world: int,
                                             batch: int) -> None:
    """Counted over all ranks: no sample twice in an epoch, and none left out beyond the remainder
    that fills no global batch (N mod world x batch)."""
    data = counted[shard_size]
    per_epoch = []
    for epoch in range(2):
        seen: list[int] = []
        for rank in range(world):
            loader = LatentLoader(data, batch, seed=11, rank=rank, world_size=world, num_workers=0)
            n = loader.steps_per_epoch
            seen += torch.cat([b["labels"] for b in take(loader, 2 * n)[epoch * n : (epoch + 1) * n]]).tolist()
        assert len(seen) == len(set(seen)) == 48 - 48 % (world * batch)
        per_epoch.append(seen)
    assert per_epoch[0] != per_epoch[1]  # each epoch its own order


def test_the_stream_does_not_depend_on_the_worker_count(counted: dict[int, Path]) -> None:
    def stream(workers: int) -> list[dict[str, torch.Tensor]]:
        return take(LatentLoader(counted[5], 4, seed=2, rank=1, world_size=2, num_workers=workers, start_step=3), 7)

    reference = stream(0)
    for workers in (1, 3):
        for a, b in zip(reference, stream(workers), strict=True):
            assert torch.equal(a["labels"], b["labels"])
            assert torch.equal(a["latents"], b["latents"])


def global_batches(data: Path, world: int, micro: int, global_batch: int, steps: int, start: int = 0,
                   workers: int = 0) -> list[dict[str, torch.Tensor]]:
    """Each step's global batch as the ranks see it: their micro-batches joined in rank order."""
    accum = global_batch // (micro * world)
    per_rank = [take(LatentLoader(data, micro, global_batch=global_batch, seed=3, rank=r, world_size=world,
                                  num_workers=workers, start_step=start), steps * accum) for r in range(world)]
    return [{key: torch.cat([b[key] for r in range(world) for b in per_rank[r][s * accum : (s + 1) * accum]])
             for key in ("latents", "labels", "sample_ids")} for s in range(steps)]


@pytest.mark.parametrize(("world", "micro", "start", "workers"), [(2, 1, 0, 0), (4, 1, 0, 2), (1, 2, 0, 0),
                                                                   (2, 2, 1, 0), (4, 1, 2, 0)])
def test_the_stream_is_the_same_on_any_number_of_ranks(encoded_flip: Path, world: int, micro: int, start: int,
                                                       workers: int) -> None:
    """A global batch of 4 (posterior noise and random flips) split over 1, 2 or 4 ranks, with or
    without accumulation, from step 0 or a later step: the same samples with the same noise per step."""
    reference = global_batches(encoded_flip, 1, 1, 4, 5)
    other = global_batches(encoded_flip, world, micro, 4, 5 - start, start=start, workers=workers)
    for a, b in zip(reference[start:], other, strict=True):
        assert torch.equal(a["sample_ids"], b["sample_ids"])
        assert torch.equal(a["latents"], b["latents"])
    assert not torch.equal(reference[0]["latents"], reference[1]["latents"])


def test_a_global_batch_that_does_not_split_is_refused(encoded_flip: Path) -> None:
    with pytest.raises(ValueError, match="multiple of micro_batch 2 x 2 ranks"):
        LatentLoader(encoded_flip, 2, global_batch=6, seed=0, rank=0, world_size=2)


def test_the_reader_streams_are_independent() -> None:
    """The epoch order, batch noise and validation noise never share a seed (numpy pads short
    entropy with zeros, so plain (seed, e) and (seed, e, 0, 0) would coincide)."""
    from mdt.data.reader import _EPOCH_ORDER, _SAMPLE_NOISE, _VALIDATION_NOISE, _seed

    seeds = [_seed(0, _EPOCH_ORDER, 0), _seed(0, _SAMPLE_NOISE, 0, 0), _seed(0, _VALIDATION_NOISE, 0),
             _seed(0, _EPOCH_ORDER, 1), _seed(0, _SAMPLE_NOISE, 0, 1), _seed(0, _SAMPLE_NOISE, 1, 0), _seed(1, 0, 0)]
    assert len(set(seeds)) == len(seeds)


def test_every_rank_gets_the_same_number_of_full_batches(encoded_flip: Path) -> None:
    counts = [s.count for s in read_manifest(encoded_flip).shards]
    assert len(set(counts)) > 1  # the fixture's shards are uneven
    lengths = set()
    for rank in range(3):
        loader = LatentLoader(encoded_flip, 2, seed=0, rank=rank, world_size=3, num_workers=0)
        batches = take(loader, 4 * loader.steps_per_epoch)
        lengths.add(loader.steps_per_epoch)
        assert all(b["latents"].shape[0] == 2 for b in batches)
    assert lengths == {sum(counts) // 3 // 2}


def test_shards_argument_restricts_the_data(encoded_flip: Path) -> None:
    loader = LatentLoader(encoded_flip, 2, seed=0, num_workers=0, shards=["shard-000000.tar"])
    labels = torch.cat([b["labels"] for b in take(loader, 6)])
    assert set(labels.tolist()) == {0}  # the first shard holds cat images only
    with pytest.raises(UserError, match="shard-999999.tar"):
        LatentLoader(encoded_flip, 2, seed=0, shards=["shard-999999.tar"])


def test_reader_mistakes_are_user_errors(encoded_flip: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="mdt encode"):
        LatentLoader(tmp_path, 2, seed=0)
    with pytest.raises(UserError, match="batch"):
        LatentLoader(encoded_flip, 64, seed=0)


def test_validation_batches_are_deterministic_and_finite(encoded_flip: Path) -> None:
    first = list(iter_validation_batches(encoded_flip, 4, seed=3))
    second = list(iter_validation_batches(encoded_flip, 4, seed=3))
    assert [len(b["labels"]) for b in first] == [4, 4, 2]
    keys = [k for b in first for k in b["keys"]]
    assert keys == sorted(keys)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a["latents"], b["latents"])
        assert a["keys"] == b["keys"]
    reseeded = next(iter_validation_batches(encoded_flip, 4, seed=4))
    assert not torch.equal(reseeded["latents"], first[0]["latents"])
    subset = list(iter_validation_batches(encoded_flip, 100, shards=["shard-000001.tar"]))
    assert len(subset) == 1
    assert len(subset[0]["keys"]) == read_manifest(encoded_flip).shards[1].count


def copy_with_first_shard_edited(source: Path, tmp_path: Path, edit) -> Path:
    """A copy of the encoded data whose shard-000000.tar has each member replaced by
    `edit(member, payload)`: a list of (TarInfo, bytes) to write in its place."""
    data = tmp_path / "data"
    shutil.copytree(source, data)
    shard = data / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, payload in members:
            for info, data_bytes in edit(member, payload):
                info.size = len(data_bytes)
                tar.addfile(info, io.BytesIO(data_bytes))
    return data


def test_fields_we_did_not_write_are_never_decoded(encoded_flip: Path, tmp_path: Path) -> None:
    """A pickle member in a shard is skipped, not unpickled (it would fail to import if it were)."""
    evil = b"cno_such_module_mdt_test\nboom\n."  # pickle protocol 0: GLOBAL of a missing module

    def add_pickles(member: tarfile.TarInfo, payload: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
        if not member.name.endswith(".json"):
            return [(member, payload)]
        key = member.name.split(".")[0]
        return [(member, payload)] + [(tarfile.TarInfo(f"{key}.{ext}"), evil) for ext in ("pyd", "pth")]

    data = copy_with_first_shard_edited(encoded_flip, tmp_path, add_pickles)
    loader = LatentLoader(data, 2, seed=0, num_workers=0, shards=["shard-000000.tar"])
    assert len(take(loader, 3)) == 3
    assert sum(len(b["keys"]) for b in iter_validation_batches(data, 2, shards=["shard-000000.tar"])) == 3


def test_a_label_outside_the_manifest_classes_is_a_user_error(encoded_flip: Path, tmp_path: Path) -> None:
    """Caught on the host, naming the sample: the model does not check label values on a GPU."""
    from mdt.data.shard_format import LABEL_FIELD

    def bad_labels(member: tarfile.TarInfo, payload: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
        return [(member, b"99" if member.name.endswith(f".{LABEL_FIELD}") else payload)]

    data = copy_with_first_shard_edited(encoded_flip, tmp_path, bad_labels)
    with pytest.raises(UserError, match="label 99, outside the manifest's .* classes.*mdt data verify"):
        take(LatentLoader(data, 2, seed=0, num_workers=0, shards=["shard-000000.tar"]), 1)
    with pytest.raises(UserError, match="label 99"):
        list(iter_validation_batches(data, 2, shards=["shard-000000.tar"]))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_truncated_mid_run_is_retried_then_named(encoded_flip: Path, tmp_path: Path, workers: int) -> None:
    data = tmp_path / "data"
    shutil.copytree(encoded_flip, data)
    loader = iter(LatentLoader(data, 2, seed=0, num_workers=workers, read_attempts=2, retry_wait_s=0.01))
    next(loader)
    for shard in data.glob("shard-*.tar"):  # every shard, so the next batch surely reads a cut one
        shard.write_bytes(shard.read_bytes()[:1024])
    with pytest.raises(UserError) as caught:
        for _ in range(20):
            next(loader)
    message = str(caught.value)
    assert "could not be read after 2 tries" in message
    assert "shard-" in message
    assert "Traceback" not in message


def test_a_non_finite_latent_stops_the_reader_naming_the_sample(encoded_flip: Path, tmp_path: Path) -> None:
    from mdt.data.shard_format import MOMENTS_FIELD, decode_moments, encode_moments

    def poison(member: tarfile.TarInfo, payload: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
        if member.name.endswith(MOMENTS_FIELD) and member.name.startswith("000000001"):
            moments = decode_moments(payload).copy()
            moments.flat[5] = np.nan
            payload = encode_moments(moments)
        return [(member, payload)]

    data = copy_with_first_shard_edited(encoded_flip, tmp_path, poison)
    with pytest.raises(UserError, match="sample 000000001 in .*shard-000000.tar holds non-finite latents"):
        take(LatentLoader(data, 3, seed=0, num_workers=0, shards=["shard-000000.tar"]), 1)


def test_a_shard_changed_after_encoding_is_named(encoded_flip: Path, tmp_path: Path) -> None:
    def drop_second(member: tarfile.TarInfo, payload: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
        return [] if member.name.startswith("000000001") else [(member, payload)]

    data = copy_with_first_shard_edited(encoded_flip, tmp_path, drop_second)
    with pytest.raises(UserError, match="shard-000000.tar holds 2 samples but the manifest lists 3"):
        LatentLoader(data, 2, seed=0, num_workers=0)


LOADER_UNDER_SIGNAL = """
import signal, sys
from mdt.data.reader import LatentLoader
got = []
signal.signal(signal.SIGTERM, lambda *a: got.append(1))
batches = iter(LatentLoader(sys.argv[1], 2, seed=0, num_workers=2))
next(batches)
print("ready", flush=True)
while not got:
    next(batches)
for _ in range(10):
    next(batches)  # the workers are alive and still deliver
print("handled", flush=True)
"""


@pytest.mark.slow
def test_loader_workers_leave_a_group_sigterm_to_the_trainer(encoded_flip: Path) -> None:
    import os
    import signal
    import subprocess

    from helpers import REPO_ROOT, child_env, python_command

    proc = subprocess.Popen(python_command("-c", LOADER_UNDER_SIGNAL, str(encoded_flip)), cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=child_env())
    assert proc.stdout.readline().strip() == "ready"
    os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its two workers, as SLURM delivers it
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert stdout.strip() == "handled", stderr[-2000:]
