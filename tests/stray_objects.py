"""Stray objects made for real, as crashes and outages leave them, beside referenced ones and files that
are not the service's: the scene `qlora admin sweep-storage` is tested on (tests/fast, tests/storage)."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field

from sqlalchemy import delete
from sqlalchemy.orm import Session

from app.datasets.tables import Dataset
from app.jobs.tables import Artifact, Checkpoint, Job, QuantizedBase
from app.storage import Storage, StoredObject, make_key
from app.teams.service import create_team
from worker.training.spec import JobSpec


def store(storage: Storage, key: str, data: bytes | None = None) -> StoredObject:
    with storage.writer(key) as writer:
        writer.write(data if data is not None else key.encode() * 3)
        return writer.commit()


@dataclass
class Scene:
    team_id: str
    strays: list[str] = field(default_factory=list)  # old, unreferenced, of the service's form: listed
    referenced: list[str] = field(default_factory=list)  # a row refers to each
    young: list[str] = field(default_factory=list)  # unreferenced, but just written
    foreign: list[str] = field(default_factory=list)  # not of the service's form

    @property
    def old(self) -> list[str]:
        """What the test ages past the sweep's --older-than (all but the young)."""
        return self.strays + self.referenced + self.foreign


def build(session: Session, storage: Storage, team_name: str = "team-a") -> Scene:
    team = create_team(session, team_name)
    spec = JobSpec.parse({"base_model": "llama-3-8b", "training": {"max_steps": 10}})
    job = Job(team_id=team.id, status="succeeded", attempt=1, base_model="llama-3-8b",
              spec=spec.model_dump(mode="json"), queue="gpu-default")
    session.add(job)
    session.commit()
    scene = Scene(team.id)

    def dataset_row(obj: StoredObject) -> Dataset:
        return Dataset(team_id=team.id, filename="train.jsonl", storage_key=obj.key, bytes=obj.size, sha256=obj.sha256,
                       status="ready", format="chat", rows=1)

    # Referenced: one of each kind of row.
    kept = store(storage, make_key(team.id, "datasets"))
    session.add(dataset_row(kept))
    checkpoint = store(storage, make_key(team.id, "checkpoints"))
    session.add(Checkpoint(job_id=job.id, attempt=1, step=10, storage_key=checkpoint.key, bytes=checkpoint.size,
                           sha256=checkpoint.sha256))
    artifact = store(storage, make_key(team.id, "artifacts"))
    session.add(Artifact(job_id=job.id, kind="adapter", storage_key=artifact.key, bytes=artifact.size,
                         sha256=artifact.sha256))
    base = store(storage, make_key("shared", "quantized-bases"))
    session.add(QuantizedBase(key=hashlib.sha256(b"tiny").hexdigest(), storage_key=base.key, bytes=base.size,
                              sha256=base.sha256, identity={"model": "tiny"}))
    scene.referenced += [kept.key, checkpoint.key, artifact.key, base.key]

    # Strays. An upload stored and never recorded (the API process killed between the two commits), a
    # checkpoint uploaded by a training process whose worker was killed before recording it, and a
    # quantized base likewise:
    scene.strays += [store(storage, make_key(team.id, "datasets")).key,
                     store(storage, make_key(team.id, "checkpoints"), b"c" * 5000).key,
                     store(storage, make_key("shared", "quantized-bases")).key]
    # a pruned checkpoint and a deleted dataset whose objects' deletes failed (storage out of reach) after
    # their rows were deleted:
    pruned = store(storage, make_key(team.id, "checkpoints"))
    session.add(Checkpoint(job_id=job.id, attempt=1, step=5, storage_key=pruned.key, bytes=pruned.size,
                           sha256=pruned.sha256))
    dropped = store(storage, make_key(team.id, "datasets"))
    session.add(dataset_row(dropped))
    session.commit()
    session.execute(delete(Checkpoint).where(Checkpoint.storage_key == pruned.key))
    session.execute(delete(Dataset).where(Dataset.storage_key == dropped.key))
    session.commit()
    scene.strays += [pruned.key, dropped.key]

    # Unreferenced, but just uploaded: its row may be about to be recorded.
    scene.young.append(store(storage, make_key(team.id, "artifacts")).key)

    # Other files in a shared bucket or directory, some nearly of the service's form.
    hex32 = uuid.uuid4().hex
    scene.foreign += [store(storage, key).key for key in (
        "notes/readme.txt", f"{team.id}/datasets/readme.txt", f"{team.id}/models/{hex32}", f"shared/datasets/{hex32}",
        f"team-a/datasets/{hex32}", f"{team.id}/datasets/{hex32}/extra", f"{team.id}/datasets/{hex32.upper()}")]
    return scene
