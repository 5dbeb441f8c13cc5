"""Ask questions about a long document with the plain `openai` client, against hisa-serve (or any
OpenAI-compatible server).

    hisa-serve &                                   # or: docker run --gpus all -p 8000:8000 hisa-serve
    python examples/ask_document.py book.txt "Who is the narrator?" "Where does the story begin?"

The document goes first and each question last, with the same system prompt every time: the server keeps the
document's KV cache, so from the second question on only the question is prefilled (see `cached_tokens` below).
"""

import os
import sys
import time

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
    api_key=os.environ.get("HISA_API_KEY", "EMPTY"),  # any string unless the server was started with --api-key
)


def ask(document: str, question: str, model: str) -> None:
    messages = [
        {"role": "system", "content": "You answer questions about the document the user gives you."},
        {"role": "user", "content": f"<document>\n{document}\n</document>\n\nQuestion: {question}"},
    ]
    start, first = time.perf_counter(), None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=0,
        max_tokens=int(os.environ.get("MAX_TOKENS", "512")),
        stream=True,
        stream_options={"include_usage": True},  # the last chunk carries the token counts
    )
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.perf_counter()
                print(choice.delta.content, end="", flush=True)
        if chunk.usage:
            cached = chunk.usage.prompt_tokens_details.cached_tokens if chunk.usage.prompt_tokens_details else 0
            ttft = f"{first - start:.2f} s" if first else "n/a"
            print(f"\n[{chunk.usage.prompt_tokens} prompt tokens, {cached} from the prefix cache, "
                  f"first token after {ttft}]", file=sys.stderr)


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(f"usage: {sys.argv[0]} FILE QUESTION [QUESTION...]")
    with open(sys.argv[1], encoding="utf-8") as fh:
        document = fh.read()
    model = client.models.list().data[0].id  # hisa-serve serves one model
    for question in sys.argv[2:]:
        print(f"\n## {question}")
        ask(document, question, model)


if __name__ == "__main__":
    main()
