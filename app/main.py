"""create_app(): routers, error handlers, lifespan. The API process never imports torch."""

from __future__ import annotations

import gc
import logging
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import logs
from app.broker import broker_answers
from app.config import Settings, get_settings
from app.datasets.routes import router as datasets_router
from app.db import api_database_url, engine_for, statement_timeout_of
from app.deps import session_end_threads
from app.errors import (
    ERROR_RESPONSES,
    AppError,
    DatabaseUnavailable,
    InsufficientStorage,
    Invalid,
    NotFound,
    QuotaExceeded,
    StorageUnavailable,
)
from app.jobs.preflight import PreflightRunner
from app.jobs.reaper import ReaperThread
from app.jobs.routes import router as jobs_router
from app.jobs.schemas import JobCreate
from app.jobs.stream import JobFeeds, StreamSlots
from app.jobs.turns import Turns
from app.models.routes import router as models_router
from app.openai.result_files import ResultFiles
from app.openai.routes import router as openai_router
from app.openai.translate import openai_error
from app.operations.readiness import Look, Readiness
from app.operations.routes import router as operations_router
from app.operations.service import FinishedJobs
from app.quotas.routes import router as quotas_router
from app.quotas.service import UploadsInFlight
from app.ranges import download_slots
from app.recent import Recent
from app.routing import declares_body, json_body_turns
from app.scheduling.service import SchedulerThread
from app.shares import TeamShares
from app.storage.base import ObjectNotFound, storage_from_settings, storage_out_of_reach
from app.teams.routes import router as teams_router
from app.teams.service import CallerCache
from app.text import format_bytes
from app.uploads import STREAMED_BODY, upload_slots
from app.usage.routes import router as usage_router
from app.web.routes import STATIC_DIR, DashboardFiles
from app.web.routes import router as web_router
from worker.training.protocol import out_of_space
from worker.training.spec import excerpt

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    given = settings or get_settings()
    # The API's own connections give up on a database that does not answer, and bound each statement
    # (app/db.api_database_url); its reaper and scheduler loops are not statement-bound (their work is not a
    # request's, and may be long), and the CLI and migrations keep the URL as set.
    settings = given.model_copy(update={"database_url": api_database_url(
        given.database_url, given.api_database_timeout_s, given.api_statement_timeout_s)})
    loop_settings = given.model_copy(update={"database_url": api_database_url(
        given.database_url, given.api_database_timeout_s, 0)})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        settings.check_timing()
        with engine_for(settings.database_url).connect() as conn:  # fail at start, not at the first request
            conn.execute(text("SELECT 1"))
        app.state.session_ends = session_end_threads()  # see app.deps.get_session
        # Background loops: every API process runs them, the holder of each one's lease works (0: off here).
        loops = [loop for loop, interval in ((ReaperThread(loop_settings, app.state.storage), settings.reaper_interval_s),
                                              (SchedulerThread(loop_settings), settings.scheduler_interval_s))
                 if interval > 0]
        for loop in loops:
            loop.start()
        # What start-up made (modules, the app, pydantic's and SQLAlchemy's schemas) lives as long as the
        # process: frozen out of the collector's sight, a full collection under polling takes a few ms
        # instead of a hundred, during which every request in flight waited (docs/performance.md). Once
        # per process: what a process that makes many apps (the tests) froze is never collected.
        if not gc.get_freeze_count():
            gc.collect()
            gc.freeze()
        yield
        for loop in loops:
            loop.stop()
        app.state.preflight.close()

    app = FastAPI(
        title="qlora-service",
        version="0.1.0",
        summary="Fine-tune open LLMs with QLoRA: upload a dataset, post a job, download an adapter or a merged model.",
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
        docs_url=None, redoc_url=None,  # app/web/routes.py serves them, their CDN files pinned and hashed
    )
    app.state.settings = settings
    app.state.storage = storage_from_settings(settings)
    app.state.stream_slots = StreamSlots(settings.max_streams_per_key)  # live streams per key, in this process
    app.state.upload_slots = upload_slots(settings.max_uploads_per_key)  # uploads in flight per key, in this process
    app.state.download_slots = download_slots(settings.max_downloads_per_key)  # downloads streaming per key, here
    app.state.job_feeds = JobFeeds()  # one poll per watched job, in this process, for all its streams
    app.state.callers = CallerCache(settings.key_cache_s)  # who each API key is, read again every few seconds
    app.state.standings = Recent(settings.standings_cache_s)  # each GPU class's queue order, read again each second
    app.state.preflight = PreflightRunner(settings.preflight_processes)  # child processes that tokenize job data
    app.state.uploads_in_flight = UploadsInFlight()  # what each team's uploads hold of its storage room, in this process
    app.state.team_turns = Turns()  # one job creation or preflight at a time per team, in this process
    app.state.json_bodies = json_body_turns()  # JSON requests per key at once, in this process (app/routing.py)
    app.state.team_shares = TeamShares(settings.request_slots)  # each team's share of the requests in progress
    app.state.result_files = ResultFiles()  # succeeded jobs' step_metrics.csv, built once in this process (/v1 files)
    app.state.finished_jobs = FinishedJobs()  # what /metrics has read of finished jobs, kept between scrapes

    @app.exception_handler(AppError)
    async def app_error(request: Request, exc: AppError):
        # The openai SDK sends a 429 again twice unless told not to: over a quota, the same request
        # (a whole file upload) would only be refused again.
        headers = {**exc.headers, **({"x-should-retry": "false"} if isinstance(exc, QuotaExceeded) else {})}
        if request.url.path.startswith("/v1/"):  # the OpenAI-compatible API answers in OpenAI's shape
            status, body = openai_error(exc.status, exc.message, exc.code, exc.details)
            return JSONResponse(body, status_code=status, headers=headers)
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def request_invalid(request: Request, exc: RequestValidationError):
        """FastAPI's own checks of parameters and bodies, answered as any Invalid."""
        details = [{"field": "body", "message": f"not valid JSON: {err['ctx']['error']}"} if err["type"] == "json_invalid"
                   # no body at all: the field is the body itself
                   else {"field": ".".join(str(p) for p in err["loc"] if p != "body") or "body",
                         "message": "a JSON object is required" if tuple(err["loc"]) == ("body",) and err["type"] == "missing"
                         else err["msg"]}
                   for err in exc.errors()]
        message = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        return await app_error(request, Invalid(message, details=details))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        """Starlette's own answers (no such route, a method not allowed, a body that does not parse)
        in the same shape as every other error."""
        error = AppError(str(exc.detail), code=HTTP_ERROR_CODES.get(exc.status_code, "bad_request"))
        error.status = exc.status_code
        response = await app_error(request, error)
        response.headers.update(exc.headers or {})  # 405's Allow
        return response

    @app.exception_handler(ObjectNotFound)
    async def object_gone(request: Request, exc: ObjectNotFound):
        """A stored file deleted between the read of its row and its opening (a download racing a delete)."""
        return await app_error(request, NotFound("its stored file is gone: it was deleted meanwhile"))

    @app.exception_handler(OSError)
    async def disk_error(request: Request, exc: OSError):
        """A write the server's disk refused (an upload to local storage, a file the API writes) answers
        507: the request's work is undone (a writer aborts, the transaction rolls back), and the same request
        succeeds once there is room. Any other OSError goes on to be a bug's 500, its traceback logged."""
        if not out_of_space(exc):
            raise exc
        log.error("a write on %s failed: the disk is full: %s", request.url.path, exc)
        return await app_error(request, InsufficientStorage(
            "the server's storage is full, so this request could not be stored; nothing of it was kept. "
            "Send it again later; an operator must free space (the API's log has the error)"))

    @app.exception_handler(DBAPIError)
    async def database_error(request: Request, exc: DBAPIError):
        """The database refused or lost the request for now (out of reach, restarting, a dropped connection, its
        disk full, a statement past QLORA_API_STATEMENT_TIMEOUT_S): 503, which clients send again (the `qlora`
        CLI does), rather than a 500 that says nothing. Its transaction was rolled back: nothing was half done.
        Any other database error (a constraint a bug broke) goes on to be a bug's 500."""
        if not (isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated):
            raise exc
        log.error("the database failed %s %s: %s", request.method, request.url.path, exc)
        if statement_timeout_of(exc):
            return await app_error(request, database_busy(settings))
        full = "disk is full" in str(exc) or "DiskFull" in type(exc.orig).__name__
        why = "its disk is full (an operator must free space)" if full else "it is unreachable, busy or out of room"
        return await app_error(request, DatabaseUnavailable(
            f"the database could not serve this request: {why}; nothing of it was kept. Send it again later",
            headers={"Retry-After": "10"}))

    @app.exception_handler(PoolTimeout)
    async def no_connection(request: Request, exc: PoolTimeout):
        """No database connection came free within QLORA_API_DATABASE_TIMEOUT_S (every one of the pool's was
        busy or connecting to a database that does not answer): 503 rather than a bug's 500."""
        log.error("no database connection for %s %s: %s", request.method, request.url.path, exc)
        return await app_error(request, DatabaseUnavailable(
            f"no database connection came free within {settings.api_database_timeout_s} s (the database is slow "
            "or unreachable); nothing of this request was kept. Send it again later", headers={"Retry-After": "10"}))

    async def storage_error(request: Request, exc: Exception):
        """S3 out of reach for now (down, answering 503, too slow): 503, which clients send again, rather than a
        500. An upload's writer aborted its object and the transaction rolled back: nothing was kept. Any other
        S3 error goes on to be a bug's 500."""
        if not storage_out_of_reach(exc):
            raise exc
        log.error("object storage failed %s %s: %s", request.method, request.url.path, exc)
        return await app_error(request, StorageUnavailable(
            "object storage could not be reached, so this request was not carried out: nothing of it was kept. "
            "Send it again later (the API's log has the error)", headers={"Retry-After": "10"}))

    if settings.storage_url.startswith("s3://"):  # only then is botocore imported
        import botocore.exceptions

        app.add_exception_handler(botocore.exceptions.BotoCoreError, storage_error)
        app.add_exception_handler(botocore.exceptions.ClientError, storage_error)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        """A bug's 500 in the shape of every other error (the OpenAI SDK reads /v1's); the exception goes
        on to the server's log with its traceback."""
        error = AppError("internal error; the API's log has what went wrong", code="internal_error")
        error.status = 500
        return await app_error(request, error)

    app.add_middleware(RequestScope, max_body_bytes=settings.max_json_bytes, refuse=app_error)

    # GET and HEAD as two routes, not one api_route of both: that gave both methods one operationId (a client
    # generator refuses the schema), and which method it was named after changed from run to run (a set's order).
    @app.get("/health", tags=["operations"])
    @app.head("/health", tags=["operations"])  # load balancers probe with either
    async def health():
        return {"status": "ok"}

    readiness = Readiness(settings.database_url, settings.api_database_timeout_s, [
        Look("broker", "QLORA_BROKER_URL", lambda: broker_answers(settings), settings.api_database_timeout_s),
        Look("storage", "QLORA_STORAGE_URL", app.state.storage.now, settings.api_database_timeout_s)])

    @app.get("/ready", tags=["operations"])
    @app.head("/ready", tags=["operations"])
    async def ready():
        """Whether this process can serve requests: the database answers a `SELECT 1` within
        QLORA_API_DATABASE_TIMEOUT_S. 503 with what is wrong otherwise, for a readiness probe (/health stays a
        liveness probe: the process answers). The broker and storage are named too, "degraded" where either is
        down, without a 503 (app/operations/readiness.py says why). One check at a time per process, shared by
        the probes that ask within a second of it."""
        answer = await readiness.answer()
        if not answer.ok:
            return JSONResponse(answer.body(), status_code=503, headers={"Retry-After": "10"})
        return answer.body()

    app.include_router(models_router)
    app.include_router(datasets_router)
    app.include_router(jobs_router)
    app.include_router(openai_router)
    app.include_router(operations_router)
    app.include_router(quotas_router)
    app.include_router(teams_router)
    app.include_router(usage_router)
    app.include_router(web_router)  # the dashboard at /
    app.mount("/static", DashboardFiles(directory=STATIC_DIR), name="static")
    document_request_models(app, [JobCreate])
    return app


def database_busy(settings: Settings) -> DatabaseUnavailable:
    """A request's statement cancelled at QLORA_API_STATEMENT_TIMEOUT_S."""
    return DatabaseUnavailable(
        f"a database statement of this request ran past {settings.api_statement_timeout_s:g} s "
        "(QLORA_API_STATEMENT_TIMEOUT_S) and was cancelled: the database is busy, or another transaction holds a "
        "lock this request needs; nothing of it was kept. Send it again later",
        code="database_busy", headers={"Retry-After": "10"})


HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class RequestScope:
    """What every request goes through before its route, as plain ASGI middleware: Starlette's
    `@app.middleware("http")` runs each request in a task group of its own with its body through a
    memory stream, which cost a quarter of a status poll's time in the profile (docs/performance.md).

    - A URL with NUL in it is answered 400 here, once: no id or parameter holds NUL, and Postgres
      fails any query that compares with one.
    - A body sent compressed (Content-Encoding: gzip, as some HTTP clients can be set to send) is answered
      415 `unsupported_content_encoding`, naming it, before any of it is read, as RFC 7694 has a server do:
      no route decodes one, and read as it came it was "not valid JSON: expected value at line 1 column 1",
      or for an upload "not valid multipart/form-data: Expected boundary character 45, got 31". A request
      that declares no body (a cancel) is let through, whatever Content-Encoding its client sends on all.
    - These refusals carry the headers every answer does (below), as the routes' answers.
    - A body that a route reads whole (JSON) is refused past `max_body_bytes` (413): up front by its
      Content-Length (a client that sent Expect: 100-continue is never asked for it), else as it
      arrives (a chunked one declares none). FastAPI reads a body whole
      into memory before the route runs, and parsing holds about three times it: without this, a
      2 GB POST /jobs held 6 GB. A route that streams its body under a limit of its own (an upload:
      app.uploads.read_multipart) says so in the scope before it reads, and is let through.
    - Every line logged while the request is handled names the job its path is about.
    - Every answer says not to guess its type (X-Content-Type-Options) and to send no Referer onward;
      an answer to a request with an API key that sets no caching of its own is not stored (a
      browser's cache would keep a team's data past a sign-out); the dashboard's static files are
      revalidated, so an upgrade never runs stale modules beside new ones.
    """

    def __init__(self, app: ASGIApp, refuse: Callable[[Request, AppError], Awaitable[Response]], max_body_bytes: int):
        self.app, self.refuse, self.max_body_bytes = app, refuse, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = self.with_headers(scope, send)  # on a refusal here too: every answer carries them
        refusal = None
        if "\x00" in scope["path"] or b"%00" in scope.get("query_string", b""):
            refusal = AppError("the URL holds a NUL character (%00); no id or parameter has one")
        elif scope["method"] in BODY_METHODS:
            refusal = _encoded_body(scope)
        if refusal is not None:
            response = await self.refuse(Request(scope, receive), refusal)
            return await response(scope, receive, send)
        if scope["method"] in BODY_METHODS:
            receive = self.bounded(scope, receive)
        job_id = logs.job_id_in(scope["path"])
        if job_id is None:
            return await self.app(scope, receive, send)
        with logs.job_context(job_id):
            await self.app(scope, receive, send)

    @staticmethod
    def with_headers(scope: Scope, send: Send) -> Send:
        if scope["path"].startswith("/static/"):
            caching: bytes | None = b"no-cache"
        else:
            caching = b"no-store" if any(name == b"authorization" for name, _ in scope["headers"]) else None

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                headers += SECURITY_HEADERS
                if caching is not None and not any(name.lower() == b"cache-control" for name, _ in headers):
                    headers.append((b"cache-control", caching))
            await send(message)
        return sending

    def bounded(self, scope: Scope, receive: Receive) -> Receive:
        """`receive`, refusing a body over max_body_bytes: the route's reading of it raises a 413, which
        the error handlers answer (FastAPI passes an HTTPException from a body's reading through)."""
        limit = self.max_body_bytes

        def too_large() -> StarletteHTTPException:
            return StarletteHTTPException(413, f"the request body is over the limit of {format_bytes(limit)} for "
                                               "JSON; an operator can raise QLORA_MAX_JSON_BYTES")

        declared = dict(scope["headers"]).get(b"content-length", b"")
        declared_over = declared.isdigit() and int(declared) > limit
        received = 0

        async def counted() -> Message:
            nonlocal received
            if scope.get(STREAMED_BODY):
                return await receive()
            if declared_over:  # before the first read: a client that sent Expect: 100-continue sends nothing
                raise too_large()
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise too_large()
            return message
        return counted


def _encoded_body(scope: Scope) -> AppError | None:
    """The refusal of a request whose body is sent compressed (any Content-Encoding but identity), or None. A
    request with no body (a cancel, a pause, a resume) has nothing compressed, whatever a client set to send
    Content-Encoding on every request says."""
    if not declares_body(Headers(scope=scope)):
        return None
    codings = [value.decode("latin-1").strip().lower() for name, value in scope["headers"] if name == b"content-encoding"]
    if all(coding in ("", "identity") for coding in codings):
        return None
    error = AppError(f"the request body is sent with Content-Encoding: {excerpt(', '.join(codings))}, which this API "
                     "does not decode; send it uncompressed (and a dataset as its .jsonl, not compressed)",
                     code="unsupported_content_encoding", headers={"Accept-Encoding": "identity"})
    error.status = 415
    return error


def document_request_models(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Add request models to the OpenAPI schema's components. A route that reads a raw JSON body (to
    report every bad field in one answer, in the service's words) names its model there with
    `openapi_extra` (see app/jobs/routes.py); FastAPI only adds the models that parameters use."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            components = generate().setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(definition.pop("$defs", {}))
                components[model.__name__] = definition
        assert app.openapi_schema is not None  # generate() stored it
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
