"""My images (every job of the member, newest first, searched and filtered, keyset-paged), a
job's page, and its files: full-size PNGs as stored (their `parameters` metadata intact),
thumbnails with caching headers, and the pictures the member gave the job."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from bot.core.execute import safe_path
from bot.core.gallery import FilterError, GalleryFilter
from bot.core.models import Job, JobKind
from bot.web.context import context, require_member
from bot.web.errors import WebError, not_found
from bot.web.numbers import query_day, whole_number
from bot.web.thumbnails import NoSuchImage, shows_images, source_path
from bot.web.visibility import job_id_in, visible_job
from generation.images import read_parameters

ASPECTS = ("square", "landscape", "portrait", "1:1", "16:9", "9:16", "3:2", "2:3", "4:3", "3:4")
IMAGE_CACHE = "private, max-age=86400"
# The image parameters shown on a job's page, in this order (the rest follow by name).
SHOWN_FIRST = ("prompt", "negative_prompt", "model", "width", "height", "steps", "guidance")
HIDDEN = {"inputs", "prompt", "negative_prompt"}
PERSONALIZE = "personalize"


def read_filter(query: Any) -> tuple[GalleryFilter, int | None]:
    """The filter and `before` in a gallery's query string; 400 when one is malformed."""

    before_text = query.get("before", "")
    before = whole_number(before_text, 18) if before_text else None
    if before_text and before is None:
        raise WebError(400, "That page address is malformed.")
    text = query.get("q", "")
    if len(text) > 200:
        raise WebError(400, "A search is at most 200 characters.")
    try:
        flt = GalleryFilter(
            text=text.strip(),
            model=query.get("model", ""),
            kind=query.get("kind", ""),
            aspect=query.get("aspect", ""),
            since=query_day(query, "from"),
            until=query_day(query, "to"),
        )
    except FilterError as exc:
        raise WebError(400, str(exc)) from None
    return flt, before


def page_query(flt: GalleryFilter, **extra: Any) -> str:
    values = {
        "q": flt.text,
        "model": flt.model,
        "kind": flt.kind,
        "aspect": flt.aspect,
        "from": flt.since.isoformat() if flt.since else "",
        "to": flt.until.isoformat() if flt.until else "",
        **extra,
    }
    return urlencode({k: v for k, v in values.items() if v not in ("", None)})


async def my_images(request: web.Request) -> web.StreamResponse:
    member = require_member(request)
    ctx = context(request)
    flt, before = read_filter(request.query)
    page = await ctx.gallery.member_page(member.user_id, flt, before, ctx.config.page_size)
    return ctx.templates.render(
        request,
        "images.html",
        title="My images",
        page=page,
        flt=flt,
        models=await ctx.gallery.models(member.user_id),
        kinds=[k.value for k in JobKind],
        aspects=ASPECTS,
        next_query=page_query(flt, before=page.next_before) if page.next_before else "",
        first_query=page_query(flt) if before else None,
    )


def _parameters(job: Job) -> list[tuple[str, str]]:
    data = dict(job.request_data)
    keys = [k for k in SHOWN_FIRST if k in data and k not in HIDDEN]
    keys += sorted(k for k in data if k not in keys and k not in HIDDEN)
    shown = []
    for key in keys:
        value = data[key]
        if value in (None, "", [], ()):
            continue
        if key == PERSONALIZE:
            # The owner's taste, learned from their private ratings: whether, never the numbers.
            value = "yes"
        shown.append((key.replace("_", " "), str(value)))
    return shown


async def _discord_link(request: web.Request, job: Job) -> str | None:
    record = (await context(request).services.core.jobs.deliveries(job.id)).get("result")
    if record is None or "message_id" not in record.info:
        return None
    where = job.owner.guild_id if job.owner.guild_id is not None else "@me"
    base = context(request).config.discord_url
    return f"{base}/channels/{where}/{record.info['channel_id']}/{record.info['message_id']}"


def _a1111_texts(data_dir: Any, job: Job) -> list[str]:
    texts = []
    count = len(job.result.image_paths) if job.result else 0
    for index in range(1, count + 1):
        try:
            texts.append(read_parameters(source_path(data_dir, job, index)) or "")
        except (NoSuchImage, OSError):
            texts.append("")
    return texts


async def job_page(request: web.Request) -> web.StreamResponse:
    job, own = await visible_job(request)
    ctx = context(request)
    data_dir = ctx.services.config.data_dir
    texts = await asyncio.to_thread(_a1111_texts, data_dir, job)
    result = job.result
    inputs = [
        (index, str(item.get("role", "picture")))
        for index, item in enumerate(job.request_data.get("inputs", ()))
        if item.get("path")
    ]
    return ctx.templates.render(
        request,
        "job.html",
        title=f"Job {job.id}",
        job=job,
        own=own,
        prompt=job.prompt,
        negative=str(job.request_data.get("negative_prompt", "")),
        parameters=_parameters(job),
        seeds=list(result.seeds) if result else [],
        texts=texts,
        image_count=len(result.image_paths) if result and shows_images(job) else 0,
        inputs=inputs if own and not job.images_expired else [],
        discord_link=await _discord_link(request, job),
    )


def _index_in(request: web.Request) -> int:
    index = whole_number(request.match_info.get("index", ""), 2)
    if index is None:
        raise not_found()
    return index


async def image_file(request: web.Request) -> web.StreamResponse:
    """A full-size PNG (1–4) or the grid (0), its bytes exactly as stored."""
    job, _own = await visible_job(request)
    index = _index_in(request)
    data_dir = context(request).services.config.data_dir
    try:
        path = await asyncio.to_thread(source_path, data_dir, job, index)
    except NoSuchImage:
        raise not_found() from None
    response = web.FileResponse(path, headers={"Cache-Control": IMAGE_CACHE})
    response.content_type = "image/png"
    if request.query.get("download"):
        name = f"imagine-{job.id}-{'grid' if index == 0 else index}.png"
        response.headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return response


async def thumbnail(request: web.Request) -> web.StreamResponse:
    job, _own = await visible_job(request)
    index = _index_in(request)
    thumbnails = context(request).thumbnails
    try:
        path = await thumbnails.get(job, index)
    except NoSuchImage:
        raise not_found() from None
    stat = await asyncio.to_thread(path.stat)
    etag = f'"t{job.id}-{index}-{stat.st_mtime_ns:x}-{stat.st_size:x}"'
    headers = {"ETag": etag, "Cache-Control": IMAGE_CACHE}
    if etag in [tag.strip() for tag in request.headers.get("If-None-Match", "").split(",")]:
        return web.Response(status=304, headers=headers)
    body = await asyncio.to_thread(path.read_bytes)
    return web.Response(body=body, content_type="image/jpeg", headers=headers)


async def input_file(request: web.Request) -> web.StreamResponse:
    """A picture the member gave the job (an image prompt, a reference, a mask): the owner's
    only."""
    job, own = await visible_job(request)
    if not own or job.images_expired:
        raise not_found()
    index = _index_in(request)
    inputs = list(job.request_data.get("inputs", ()))
    if index >= len(inputs) or not inputs[index].get("path"):
        raise not_found()
    data_dir = context(request).services.config.data_dir
    try:
        path = safe_path(data_dir, str(inputs[index]["path"]))
    except ValueError:
        raise not_found() from None
    if not await asyncio.to_thread(path.is_file):
        raise not_found()
    return web.FileResponse(path, headers={"Cache-Control": IMAGE_CACHE})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/images", my_images)
    router.add_get("/jobs/{job_id}", job_page)
    router.add_get("/jobs/{job_id}/images/{index}.png", image_file)
    router.add_get("/jobs/{job_id}/thumbs/{index}.jpg", thumbnail)
    router.add_get("/jobs/{job_id}/inputs/{index}", input_file)


__all__ = ["add_routes", "job_id_in", "page_query", "read_filter"]
