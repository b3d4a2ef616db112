"""Thumbnails of a job's grid and images: made once, off the event loop, and kept on disk
beside the job's images (`images/<job>/thumbs/`), so retention deletes them with the images.

Each is written to a temporary name and renamed into place, so a crash never leaves half a
thumbnail that later requests would serve. Concurrent first requests for one thumbnail make
it once.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from PIL import Image

from bot.core.execute import safe_path
from bot.core.jobs import output_dir_for
from bot.core.models import Job, JobState

THUMB_SIZE_PX = 384
JPEG_QUALITY = 85


class NoSuchImage(LookupError):
    """The job has no such image (or its images expired)."""


def shows_images(job: Job) -> bool:
    """Whether the web shows the job's images: a job that succeeded, its images not expired.
    A refused job may still name its files (the safety filter withheld them; they stay on disk
    as the audit's evidence): never shown."""
    result = job.result
    return (
        job.state is JobState.SUCCEEDED
        and not job.images_expired
        and result is not None
        and bool(result.image_paths)
    )


def source_path(data_dir: Path, job: Job, index: int) -> Path:
    """The stored PNG of image `index` (1-based), or of the grid (0)."""
    result = job.result
    if result is None or not shows_images(job):
        raise NoSuchImage(index)
    if index == 0:
        relative = result.grid_path or result.image_paths[0]
    elif 1 <= index <= len(result.image_paths):
        relative = result.image_paths[index - 1]
    else:
        raise NoSuchImage(index)
    try:
        path = safe_path(data_dir, relative)
    except ValueError:
        raise NoSuchImage(index) from None
    if not path.is_file():
        raise NoSuchImage(index)
    return path


def _make(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".tmp-{os.getpid()}-{target.name}")
    try:
        with Image.open(source) as image:
            image.draft("RGB", (THUMB_SIZE_PX, THUMB_SIZE_PX))
            picture = image.convert("RGB")
            picture.thumbnail((THUMB_SIZE_PX, THUMB_SIZE_PX), Image.Resampling.LANCZOS)
            picture.save(temporary, format="JPEG", quality=JPEG_QUALITY, optimize=True)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class Thumbnails:
    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._making: dict[Path, asyncio.Future[None]] = {}
        # How many were made (not served from disk): the benchmark reads it.
        self.made = 0

    def path_for(self, job_id: int, index: int) -> Path:
        return self._data_dir / output_dir_for(job_id) / "thumbs" / f"{index}.jpg"

    async def get(self, job: Job, index: int) -> Path:
        """The thumbnail's file, made now if it isn't on disk yet."""
        source = await asyncio.to_thread(source_path, self._data_dir, job, index)
        target = self.path_for(job.id, index)
        if await asyncio.to_thread(target.is_file):
            return target
        pending = self._making.get(target)
        if pending is not None:
            await asyncio.shield(pending)
            return target
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._making[target] = future
        try:
            await asyncio.to_thread(_make, source, target)
            self.made += 1
            future.set_result(None)
        except BaseException as exc:
            future.set_exception(exc)
            # Consumed here too, so an exception no waiter reads isn't logged as lost.
            future.exception()
            raise
        finally:
            del self._making[target]
        return target
