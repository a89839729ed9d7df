"""`python -m pipeline serve`: the trained model behind an HTTP API and a chat page (127.0.0.1 by default).

Over 400 lines: the API's request and answer models, the models it serves and its routes are one contract, read
top to bottom here (the page is pipeline/web/chat.html).

At start it loads the registry's champions (models:/c2crs-recommender@champion, models:/c2crs-generator@champion)
when they were trained on this workspace's data, else the workspace's files, once. A request may name another
registered version (the page's model picker): it is loaded on first use and kept (the last few). The conversation
lives in the client: every request carries the messages so far, so the server holds no session.

Limits: a request body of at most 64 KiB with its Content-Length, at most 100 messages of at most 2,000 characters;
the models answer one request at a time (each call uses both cores), and a request that waits or runs past
`timeout` seconds gets 503 (the work it started finishes in the background). Errors are JSON {"detail": ...} with a
4xx status for what the client can fix; anything else is a 500 whose detail names a log entry, never a traceback.
"""

import asyncio
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ConfigDict, Field

from pipeline.registry import (
    CHAMPION,
    RegistryError,
    all_versions,
    data_differences,
    logged_metrics,
    model_file,
    resolve,
)
from pipeline.talk import CHAT_MODELS, chat_model_files, workspace_model
from pipeline.tracking import tracking_uri
from stages.chat.engine import Chat, Knowledge, Recommendation, Turn, load_generator, load_recommender
from stages.chat.explain import Explanation
from stages.evaluation.rec_metrics import ABLATION_PREFIX
from stages.io.outputs import settle_workspace
from stages.io.stage_log import registered_name
from stages.training.runs import TRAINING_INPUTS

log = logging.getLogger(__name__)

PAGE = Path(__file__).parent / "web" / "chat.html"
MAX_BODY_BYTES = 64 * 1024
MAX_MESSAGES, MAX_TEXT = 100, 2000
WORKSPACE = "workspace"  # the model reference of the workspace's own files
KEPT_MODELS = 4  # loaded versions besides the start-up pair


# ---------------------------------------------------------------- the API's schema


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["seeker", "recommender"]
    text: str = Field(min_length=1, max_length=MAX_TEXT, description='movies as "@<ReDial id>" or "quoted titles"')


class RecommenderChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recommender: str | None = Field(
        None, max_length=200, description="NAME/VERSION, NAME@ALIAS or 'workspace'; default: the one loaded at start"
    )


class RecommendRequest(RecommenderChoice):
    messages: list[Message] = Field(
        min_length=1, max_length=MAX_MESSAGES, description="the conversation so far, oldest first"
    )
    top_k: int = Field(10, ge=1, le=100)
    exclude_mentioned: bool = Field(True, description="leave out the movies the conversation names")
    explain: bool = True


class ChatRequest(RecommendRequest):
    messages: list[Message] = Field(
        min_length=1,
        max_length=MAX_MESSAGES,
        description="the conversation so far, oldest first, ending with the seeker's",
    )
    top_k: int = Field(3, ge=1, le=20)
    generator: str | None = Field(None, max_length=200, description="as recommender")


class ExplainRequest(RecommenderChoice):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    movie_id: int = Field(description="the ReDial id of the movie to explain (recommended or not)")


class RecommendationOut(BaseModel):
    rank: int
    movie_id: int
    title: str
    score: float
    explanation: Explanation | None = None


class RecommendResponse(BaseModel):
    recommendations: list[RecommendationOut]
    unknown_titles: list[str] = Field(description="quoted titles that name no ReDial movie (kept as words)")
    models: dict[str, str]
    elapsed_ms: float


class ChatResponse(RecommendResponse):
    response: str = Field(description="the model's next utterance, movies as titles")
    response_with_ids: str = Field(
        description='the same with movies as "@id": send it back as the recommender\'s message'
    )


class Movie(BaseModel):
    movie_id: int
    title: str
    mentions: int


# ---------------------------------------------------------------- models: loaded once, versions on first use


class Busy(Exception):
    pass


class Models:
    """The workspace's Knowledge and the loaded models. The start-up pair is the default; other registered versions
    are loaded on first use and the last KEPT_MODELS kept. One request at a time runs on them (the lock)."""

    def __init__(self, params, workspace: Path, models_from: str):
        self.params, self.workspace, self.models_from = params, workspace, models_from
        settle_workspace(workspace)  # a killed stage's half-made set, completed before the server reads it
        self.names = {kind: registered_name("c2crs", kind) for kind in CHAT_MODELS}
        files = chat_model_files(workspace, models_from)
        self.knowledge = Knowledge(params, workspace)
        self.default = {kind: self._reference(kind, files[kind]) for kind in CHAT_MODELS}
        self.loaded: OrderedDict[tuple[str, str], object] = OrderedDict()
        self.pinned = {
            ("recommender", self.default["recommender"]): load_recommender(files["recommender"], self.knowledge),
            ("generator", self.default["generator"]): load_generator(files["generator"], self.knowledge),
        }
        self.lock = threading.Lock()
        self.input_hashes: dict[str, str] = {}  # the workspace's training inputs, hashed once

    def _reference(self, kind: str, loaded: Path) -> str:
        """How a start-up model is named: NAME/VERSION of the champion when chat_model_files took it, else
        'workspace'."""
        if loaded == workspace_model(self.workspace, kind):
            return WORKSPACE
        return self._version_of(f"{self.names[kind]}@{CHAMPION}")

    def model(self, kind: str, reference: str | None) -> tuple[object, str]:
        """(the loaded model of a kind named by reference, None: the start-up one; the NAME/VERSION it is, or
        'workspace'). An alias or a bare name is looked up on every request, so a champion that moved while the
        server runs is the one used, and a version is loaded once whatever named it. Called under the lock (run)."""
        reference = self._version_of(reference or self.default[kind])
        key = (kind, reference)
        if key in self.pinned:
            return self.pinned[key], reference
        if key not in self.loaded:
            self.loaded[key] = self._load(kind, reference)
            while len(self.loaded) > KEPT_MODELS:
                self.loaded.popitem(last=False)
        self.loaded.move_to_end(key)
        return self.loaded[key], reference

    def _version_of(self, reference: str) -> str:
        """NAME/VERSION for NAME@ALIAS or NAME (registry.resolve's rules); other references as they are."""
        if reference == WORKSPACE or self.models_from == WORKSPACE or re.fullmatch(r"[^@/]+/\d+", reference):
            return reference
        version = resolve(MlflowClient(tracking_uri()), reference)
        return f"{version.name}/{version.version}"

    def _load(self, kind: str, reference: str):
        load = load_recommender if kind == "recommender" else load_generator
        if reference == WORKSPACE:
            return load(workspace_model(self.workspace, kind), self.knowledge)
        if self.models_from == WORKSPACE:
            raise ValueError(
                f"{reference}: this server was started with --models-from workspace; it uses the workspace's files only"
            )
        client = MlflowClient(tracking_uri())
        version = resolve(client, reference)
        if version.name not in self.choices_of(kind):
            raise ValueError(f"{reference}: not a {kind} this chat can use ({', '.join(self.choices_of(kind))})")
        differs = data_differences(version, self._inputs(), self.input_hashes)
        if differs:
            raise ValueError(f"{reference}: trained on other data than this workspace's ({', '.join(differs)} differ)")
        return load(model_file(client, version), self.knowledge)

    def _inputs(self) -> dict[str, Path]:
        return {name: self.workspace / path for name, path in TRAINING_INPUTS.items()}

    def choices_of(self, kind: str) -> list[str]:
        """The registered names whose versions the chat can use: C2-CRS's recommender and its ablations; the
        generators trained on C2-CRS's encoders."""
        if kind == "recommender":
            return [self.names["recommender"]] + [
                registered_name(ABLATION_PREFIX + v, "recommender") for v in self.params.ablations.variants
            ]
        return [self.names["generator"], registered_name("wo_iw", "generator")]

    def registered(self) -> dict[str, list[dict]]:
        """Per kind, the versions a user can pick: the workspace's file and every registered version of a usable
        name, with its aliases, validation metric and whether it was trained on this workspace's data."""
        out = {
            kind: [
                {
                    "reference": WORKSPACE,
                    "label": "this workspace's file",
                    "usable": True,
                    "loaded_at_start": self.default[kind] == WORKSPACE,
                }
            ]
            for kind in self.names
        }
        if self.models_from == WORKSPACE:
            return out
        client = MlflowClient(tracking_uri())
        for kind in self.names:
            metric = "valid_recall_at_50" if kind == "recommender" else "valid_perplexity"
            for name in self.choices_of(kind):
                versions = all_versions(client, name)
                aliases = client.get_registered_model(name).aliases if versions else {}
                for version in reversed(versions):
                    differs = data_differences(version, self._inputs(), self.input_hashes)
                    reference = f"{name}/{version.version}"
                    named = sorted(a for a, v in aliases.items() if str(v) == str(version.version))
                    out[kind].append(
                        {
                            "reference": reference,
                            "aliases": named,
                            "label": reference + (f" ({', '.join(named)})" if named else ""),
                            metric: logged_metrics(client, version).get(metric),
                            "usable": not differs,
                            "why_not": f"trained on other data ({', '.join(differs)} differ)" if differs else None,
                            "loaded_at_start": self.default[kind] == reference,
                        }
                    )
        return out

    def run(self, work, timeout: float):
        """work() under the lock, giving up (Busy) when the lock is not free before the deadline."""
        if not self.lock.acquire(timeout=timeout):
            raise Busy
        try:
            return work()
        finally:
            self.lock.release()


# ---------------------------------------------------------------- the app


def _turns(knowledge: Knowledge, messages: list[Message]) -> tuple[list[Turn], list[str]]:
    turns, unknown = [], []
    for message in messages:
        turn, missing = knowledge.read_turn(message.role, message.text)
        turns.append(turn)
        unknown += missing
    return turns, unknown


def _out(recommendations: list[Recommendation], first_rank: int = 1) -> list[RecommendationOut]:
    return [
        RecommendationOut(rank=rank, movie_id=r.movie_id, title=r.title, score=r.score, explanation=r.explanation)
        for rank, r in enumerate(recommendations, start=first_rank)
    ]


def _milliseconds_since(began: float) -> float:
    return round(1000 * (time.perf_counter() - began), 1)


def create_app(models: Models, timeout: float = 30.0) -> FastAPI:
    """The HTTP API and the page: request limits and error answers (_guard), then the routes (_routes)."""
    app = FastAPI(
        title="c2crs",
        version="1",
        description=__doc__.split("\n\n")[1],
        telemetry={
            "tracing": False,
            "metrics": False,
            "logs": False,
            "operation_spans": False,
            "auto_configure": False,
        },
    )  # FastAPI's OpenTelemetry hooks: nothing leaves the process
    _guard(app)
    app.include_router(_routes(models, _answerer(models, timeout), time.monotonic()))
    return app


def _guard(app: FastAPI) -> None:
    """Bodies must say their length and stay small; invalid requests get 422 without their input echoed; any other
    failure a 500 naming an incident in the server's log, never a traceback."""

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None:
                return JSONResponse({"detail": "a request body needs a Content-Length header"}, status_code=411)
            if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                return JSONResponse({"detail": f"the request body is over {MAX_BODY_BYTES} bytes"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        """FastAPI's 422 without the echo of the input (which may be large, or not encodable: a lone surrogate)."""
        return JSONResponse(
            {"detail": [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]},
            status_code=422,
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        incident = uuid.uuid4().hex[:12]
        log.error("request %s %s failed (incident %s)", request.method, request.url.path, incident, exc_info=exc)
        return JSONResponse({"detail": f"internal error; the server's log names it {incident}"}, status_code=500)


def _answerer(models: Models, timeout: float):
    async def answer(work):
        """work() in a worker thread under the models' lock, with the timeout; RegistryError (an unknown model
        version) -> 404, other ValueErrors (what the client asked cannot be done) -> 422."""
        began = time.monotonic()
        try:
            return await asyncio.wait_for(run_in_threadpool(models.run, work, timeout), timeout)
        except (TimeoutError, Busy):
            waited = time.monotonic() - began
            raise HTTPException(
                503,
                f"no answer within {timeout:g} s (waited {waited:.1f} s: the server is busy "
                "or the conversation long); try again",
            ) from None
        except RegistryError as exc:
            raise HTTPException(404, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    return answer


def _routes(models: Models, answer, started: float) -> APIRouter:
    """The page, health, the model picker's list, title search, and the three conversation endpoints."""
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    def page():
        return FileResponse(PAGE, media_type="text/html")

    @router.get("/healthz")
    def healthz() -> dict:
        """Up, and which models answer by default."""
        return {"status": "ok", "models": models.default, "uptime_s": round(time.monotonic() - started, 1)}

    @router.get("/v1/models")
    def list_models() -> dict:
        """The versions the model picker offers, per kind (recommender, generator)."""
        return {"loaded": models.default, "choices": models.registered()}

    @router.get("/v1/movies", response_model=list[Movie])
    def movies(
        q: str = Query(min_length=1, max_length=100, description="words of the title"),
        limit: int = Query(10, ge=1, le=50),
    ):
        """ReDial movies whose title contains q, most mentioned first (the page's "@" autocomplete)."""
        return models.knowledge.find(q, limit)

    _conversation_routes(router, models, answer)
    return router


def _conversation_routes(router: APIRouter, models: Models, answer) -> None:
    """/v1/recommend, /v1/chat and /v1/explain: a conversation in, the models' answer out (under answer's lock)."""

    @router.post("/v1/recommend", response_model=RecommendResponse)
    async def recommend(body: RecommendRequest):
        """The conversation so far -> the ranked movies for the model's next turn, each with its explanation."""

        def work():
            began = time.perf_counter()
            turns, unknown = _turns(models.knowledge, body.messages)
            recommender, used = models.model("recommender", body.recommender)
            ranked = Chat(models.knowledge, recommender).recommend(
                turns, body.top_k, body.exclude_mentioned, body.explain
            )
            return RecommendResponse(
                recommendations=_out(ranked),
                unknown_titles=unknown,
                models={"recommender": used},
                elapsed_ms=_milliseconds_since(began),
            )

        return await answer(work)

    @router.post("/v1/chat", response_model=ChatResponse)
    async def chat(body: ChatRequest):
        """The conversation so far (ending with the seeker) -> the model's next utterance and its recommendations."""
        if body.messages[-1].role != "seeker":
            raise HTTPException(422, "the last message must be the seeker's: the model answers the seeker")

        def work():
            began = time.perf_counter()
            turns, unknown = _turns(models.knowledge, body.messages)
            (recommender, used_recommender), (generator, used_generator) = (
                models.model("recommender", body.recommender),
                models.model("generator", body.generator),
            )
            reply = Chat(models.knowledge, recommender, generator).respond(
                turns, body.top_k, body.exclude_mentioned, body.explain
            )
            return ChatResponse(
                response=reply.text,
                response_with_ids=reply.text_with_ids,
                recommendations=_out(reply.recommendations),
                unknown_titles=unknown,
                models={"recommender": used_recommender, "generator": used_generator},
                elapsed_ms=_milliseconds_since(began),
            )

        return await answer(work)

    @router.post("/v1/explain", response_model=RecommendationOut)
    async def explain(body: ExplainRequest):
        """Why the model would (or would not) recommend one movie now: its rank among all movies and the reasons."""
        if body.movie_id not in models.knowledge.item_entity:
            raise HTTPException(404, f"movie {body.movie_id}: not a ReDial movie of this workspace's KG")

        def work():
            turns, _ = _turns(models.knowledge, body.messages)
            recommender, _ = models.model("recommender", body.recommender)
            return Chat(models.knowledge, recommender).explain_movie(turns, body.movie_id)

        rank, recommendation = await answer(work)
        return _out([recommendation], first_rank=rank)[0]


def serve(params, workspace: Path, host: str, port: int, models_from: str, timeout: float) -> int:
    import uvicorn

    from pipeline.servers import ensure_port_free

    ensure_port_free(port, "chat", host)
    print("loading the models and tables ...", flush=True)
    models = Models(params, workspace, models_from)
    print(f"models: recommender {models.default['recommender']}, generator {models.default['generator']}")
    print(f"chat page: http://{host}:{port}/   API docs: http://{host}:{port}/docs   (Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(models, timeout), host=host, port=port, log_level="warning")
    return 0
