"""OpenAI-compatible servers (vLLM, llama.cpp's servers, SGLang, hosted APIs) as a backend.

    openai:MODEL@http://host:port/v1?protocol=completions&concurrency=8

MODEL may be left out (`openai:http://host:port/v1`) when the server serves
one model: it is asked (GET /models). Options, after `?` (see `ServerSpec`):

    protocol      completions (default; base models: the prompt text goes to /completions),
                  chat-continue (the assistant message is continued on /chat/completions,
                  with vLLM's `continue_final_message`), or tools (native tool calls: a
                  `python` tool whose result goes back as a `tool` message)
    template      a local chat template (GGUF file, Hugging Face dir, tokenizer_config.json
                  or Jinja file): chat prompts are rendered here and sent to /completions
    concurrency   requests in flight at once (default 8; servers batch them)
    api_key_env   the environment variable holding the API key (default: TORA_OPENAI_API_KEY,
                  then OPENAI_API_KEY; none for a local server without one)
    retries       retries of a request that failed with 429, 5xx or a connection error
                  (default 4, exponential backoff from `backoff` seconds, default 0.5)
    timeout       seconds without a byte from the server before a request fails (default 600)
    stream        1 (default) streams every reply; 0 asks for whole replies, for a server that
                  cannot stream some (llama-cpp-python's chatml-function-calling tool calls)
    logprobs      auto (default), 1 or 0: ask for each sampled token's logprob (text protocols);
                  auto asks unless the server is llama-cpp-python's (slow at it)
    token_ids     auto (default), 1 or 0: ask for the sampled ids (vLLM's return_token_ids);
                  auto asks when the server's model listing says it is vLLM
    body.FIELD    a request field of the server's own, its value JSON (or a string), e.g.
                  body.repeat_penalty=1 for llama_cpp.server, whose default of 1.1 would
                  otherwise change sampling (the spec is recorded, so these are too)

The key is read from the environment and held by the client only: the spec
names at most the variable, and a URL with credentials in it is refused
(the spec is recorded with every trajectory).

The parts: `spec` (the spec), `connection` (the client, retries, the errors
that name the server), one object per protocol behind the backend interface
(`completions`, `chat`, `tools`), what they share in `protocol` (reading a
reply: stops, finish, token counts), and `backend`, which ties a connection
to a protocol.

Stops: tora's `StopScanner` always cuts the streamed text, so `Done.stop_string`
is right whatever the server says. The stop strings also go to the server,
which then stops without streaming the rest, but only once a response has
shown that the server reports which one fired (vLLM's `stop_reason`, SGLang's
`matched_stop`): a server that cuts at a stop string and reports only
`finish_reason: stop` (llama-cpp-python's) would make a stop string and the
model's end of text look alike. Until then the stream is closed at the stop,
which aborts the request on the server.

Chat protocols keep the record the same as any other: the prompt is the
role-tagged transcript of tora.backends.transcript (or the model's own chat
template with `template=`), the text steps hold the model's words with their
fences. With `protocol=tools` each tool call is recorded as the python block
it stands for (tora.backends.openai.tools says how several calls in one reply
run and go back).
"""

from __future__ import annotations

from tora.backends.openai.backend import OpenAIBackend
from tora.backends.openai.spec import ServerSpec
from tora.errors import ModelSpecError

__all__ = ["OpenAIBackend", "ServerSpec", "load_openai"]


def load_openai(arg: str) -> OpenAIBackend:
    try:
        import openai  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelSpecError("the openai backend needs the openai client: pip install 'tora-tir[openai]'") from exc
    return OpenAIBackend(ServerSpec.parse(arg))
