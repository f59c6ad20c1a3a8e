"""`tora serve`: the tool loop as an OpenAI-compatible HTTP API.

protocol.py  the wire format (pydantic requests, responses, chunks, errors)
app.py       the FastAPI routes, limits and auth; request fields -> SolveConfig
choices.py   one request's trajectories: run, cut at stop strings, answered or streamed
runner.py    the engine side: scheduler, kernel pool, admission, recording
server.py    uvicorn on a pre-bound socket, stopped cleanly by signals
process.py   `tora serve` as a child process (scripts, tests, benchmarks)
"""
