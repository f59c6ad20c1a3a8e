from tora.backends.base import StopScanner


def feed_all(stops: list[str], pieces: list[str]) -> tuple[str, str | None]:
    s = StopScanner(stops)
    out = "".join(s.feed(p) for p in pieces)
    return out + s.flush(), s.matched


def test_stop_split_across_pieces_never_leaks() -> None:
    out, matched = feed_all(["```output"], ["print(1)\n```\n``", "`out", "put\nignored"])
    assert out == "print(1)\n```\n"
    assert matched == "```output"


def test_partial_prefix_released_when_ruled_out() -> None:
    out, matched = feed_all(["```output"], ["a ``", "`python\nx"])
    assert out == "a ```python\nx"
    assert matched is None


def test_earliest_of_several_stops_wins() -> None:
    out, matched = feed_all(["\nQuestion:", "```output"], ["done\nQuestion: next ```output"])
    assert (out, matched) == ("done", "\nQuestion:")


def test_held_text_flushed_at_end() -> None:
    out, matched = feed_all(["```output"], ["tail ``"])
    assert (out, matched) == ("tail ``", None)


def test_random_streams_cut_exactly_where_the_whole_text_first_holds_a_stop() -> None:
    import random

    rng = random.Random(0)
    stops = ["```output", "\n```\n", "\n---", "ab"]
    for _ in range(2000):
        text = "".join(rng.choice(["a", "b", "`", "\n", "-", "x", "output", "```"]) for _ in range(rng.randint(0, 30)))
        scanner = StopScanner(stops)
        out = ""
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8))))
        for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True):
            out += scanner.feed(text[a:b])
        out += scanner.flush()
        hits = [(text.find(s), n) for n, s in enumerate(stops) if s in text]  # a tie: the first listed
        if hits:
            at, n = min(hits)
            assert out == text[:at] and scanner.matched == stops[n], text
        else:
            assert out == text and scanner.matched is None, text
