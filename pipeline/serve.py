"""`python -m pipeline serve`: the trained models behind an HTTP API and a chat page (127.0.0.1 by default).

The API's request and answer models and its routes, read top to bottom here; the models it serves are
pipeline/serve_models.py's, the page is pipeline/web/chat.html.

At start it loads the registry's champions (models:/c2crs-recommender@champion, models:/c2crs-generator@champion)
when they were trained on this workspace's data, else the workspace's files, once. A request may name any other
trained model of the workspace (`workspace:kgsf`) or registered version (the page's model pickers): it is loaded on
first use and kept (the last few); /v1/compare puts two recommenders' rankings side by side. The conversation lives
in the client: every request carries the messages so far, so the server holds no session.

Limits: a request body of at most 64 KiB with its Content-Length, at most 100 messages of at most 2,000 characters;
the models answer one request at a time (each call uses both cores), and a request that waits or runs past
`timeout` seconds gets 503 (the work it started finishes in the background). Errors are JSON {"detail": ...} with a
4xx status for what the client can fix; anything else is a 500 whose detail names a log entry, never a traceback.
"""

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from pipeline.registry import RegistryError
from pipeline.serve_models import Busy, Models
from stages.chat.engine import Chat, Knowledge, Recommendation, Turn
from stages.chat.explain import Explanation

log = logging.getLogger(__name__)

PAGE = Path(__file__).parent / "web" / "chat.html"
MAX_BODY_BYTES = 64 * 1024
MAX_MESSAGES, MAX_TEXT = 100, 2000
__all__ = ["Models", "create_app", "serve"]  # Models: pipeline/serve_models.py, the models it serves


# ---------------------------------------------------------------- the API's schema


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["seeker", "recommender"]
    text: str = Field(min_length=1, max_length=MAX_TEXT, description='movies as "@<ReDial id>" or "quoted titles"')


REFERENCE = "NAME/VERSION, NAME@ALIAS, 'workspace' (C2-CRS's file) or 'workspace:NAME' (evaluate's model NAME)"


class RecommenderChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recommender: str | None = Field(None, max_length=200, description=REFERENCE + "; default: the one loaded at start")


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


class CompareRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    recommenders: list[str] = Field(
        min_length=2, max_length=2, description="the two recommenders to compare, each as " + REFERENCE
    )
    top_k: int = Field(5, ge=1, le=20)
    exclude_mentioned: bool = True
    explain: bool = False


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
    names_recommendation: bool = Field(description="whether the model's utterance names one of the recommendations")
    template: str | None = Field(
        description="when it names none: a fixed sentence naming the top recommendation, not the model's words "
        "(show it as a template; never send it back as part of the conversation)"
    )


class CompareColumn(BaseModel):
    recommender: str = Field(description="the model that answered: NAME/VERSION or workspace[:NAME]")
    recommendations: list[RecommendationOut]


class CompareResponse(BaseModel):
    columns: list[CompareColumn] = Field(description="one per recommender asked for, in that order")
    shared: list[int] = Field(description="the movies (ReDial ids) both top-k lists hold")
    unknown_titles: list[str]
    elapsed_ms: float


class Movie(BaseModel):
    movie_id: int
    title: str
    mentions: int


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
    _compare_route(router, models, answer)
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
                names_recommendation=reply.names_recommendation,
                template=reply.template,
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


def _compare_route(router: APIRouter, models: Models, answer) -> None:
    """/v1/compare: two recommenders' top-k for the same conversation, side by side (the page's compare panel)."""

    @router.post("/v1/compare", response_model=CompareResponse)
    async def compare(body: CompareRequest):
        """The conversation so far -> each of the two recommenders' ranked movies for the model's next turn."""

        def work():
            began = time.perf_counter()
            turns, unknown = _turns(models.knowledge, body.messages)
            columns = []
            for reference in body.recommenders:
                recommender, used = models.model("recommender", reference)
                ranked = Chat(models.knowledge, recommender).recommend(
                    turns, body.top_k, body.exclude_mentioned, body.explain
                )
                columns.append(CompareColumn(recommender=used, recommendations=_out(ranked)))
            second = {r.movie_id for r in columns[1].recommendations}
            return CompareResponse(
                columns=columns,
                shared=[r.movie_id for r in columns[0].recommendations if r.movie_id in second],
                unknown_titles=unknown,
                elapsed_ms=_milliseconds_since(began),
            )

        return await answer(work)


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
