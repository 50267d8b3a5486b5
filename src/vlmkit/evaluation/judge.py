"""An LLM judge over any OpenAI-compatible chat-completions endpoint (stdlib HTTP, no extra dependency).

Used by MM-Vet: the judge compares a model's answer with the ground truth and replies with a score
in [0, 1]. Transient failures (connection errors, timeouts, HTTP 429 / 5xx) are retried with
exponential back-off; an endpoint that stays unreachable raises :class:`JudgeError` naming its URL.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

KEY_ENV_VARS = ("VLMKIT_JUDGE_KEY", "OPENAI_API_KEY")
_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?|\.\d+)")

GRADER_INSTRUCTIONS = (
    "You grade answers to questions about images. Compare the model's answer with the ground truth and "
    "reply with one number between 0.0 and 1.0: 1.0 when the answer is fully correct, 0.0 when it is wrong "
    "or missing, a value in between when it is partly correct. In a ground truth, <AND> joins parts that "
    "must all be present and <OR> joins alternatives of which one is enough. Extra detail that does not "
    "contradict the ground truth is fine. Reply with the number only."
)
GRADER_EXAMPLES = (
    ("How many apples are on the plate?", "3", "There are three apples.", "1.0"),
    ("How many apples are on the plate?", "3", "I can see 4 apples.", "0.0"),
    ("What colours are the car and the door?", "red <AND> green", "The car is red.", "0.5"),
    ("Which city is shown?", "Rome <OR> Roma", "This is Rome, Italy.", "1.0"),
    ("What does the chart show?", "Sales rise every year from 2015 to 2020.",
     "Sales grow over the years, although they dip in 2018.", "0.4"),
)


class JudgeError(ValueError):
    """The judge endpoint is unreachable, refused the request or answered something unusable."""


def parse_score(reply: str) -> float | None:
    """The first number in ``reply`` that lies in [0, 1] (``"Score: 0.7"`` -> 0.7), else None."""
    for match in _NUMBER.finditer(reply):
        value = float(match.group(1))
        if 0.0 <= value <= 1.0:
            return value
    return None


def grader_messages(question: str, ground_truth: str, prediction: str) -> list[dict[str, str]]:
    """The chat messages asking for one score: instructions, worked examples, then the case to grade."""
    def block(q: str, gt: str, pred: str, score: str) -> str:
        return f"Question: {q}\nGround truth: {gt}\nAnswer: {pred}\nScore: {score}".rstrip()

    examples = "\n\n".join(block(*e) for e in GRADER_EXAMPLES)
    case = block(question, ground_truth, prediction.replace("<AND>", "and").replace("<OR>", "or"), "")
    return [{"role": "system", "content": GRADER_INSTRUCTIONS},
            {"role": "user", "content": f"{examples}\n\n{case}"}]


@dataclass
class JudgeClient:
    """A chat-completions client for grading.

    Args:
        url: the endpoint's base URL (``http://host:8000/v1``) or the full ``.../chat/completions`` URL.
        model: the judge model name sent in each request.
        key: bearer token (None: no Authorization header).
        retries: extra attempts after a transient failure or an unparseable reply.
        timeout: seconds per request.
        backoff: seconds before the first retry (doubled each time).
    """

    url: str
    model: str
    key: str | None = None
    retries: int = 3
    timeout: float = 60.0
    backoff: float = 1.0

    @property
    def endpoint(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/chat/completions") else f"{base}/chat/completions"

    def complete(self, messages: list[dict[str, str]], max_tokens: int = 16, temperature: float = 0.0) -> str:
        """The reply text of one chat completion.

        Raises:
            JudgeError: the endpoint stays unreachable, answers a non-retryable HTTP error or a body
                without ``choices[0].message.content``; the message names the URL.
        """
        body = json.dumps({"model": self.model, "messages": messages, "temperature": temperature,
                           "max_tokens": max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = response.read()
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode("utf-8", "replace")
                if exc.code not in _RETRY_STATUS:
                    raise JudgeError(f"judge endpoint {self.endpoint} answered HTTP {exc.code}: {detail}") from None
                last = f"HTTP {exc.code}: {detail}"
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                last = str(getattr(exc, "reason", exc))
                continue
            try:
                return json.loads(payload)["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                raise JudgeError(f"judge endpoint {self.endpoint} did not answer a chat completion: "
                                 f"{payload[:200].decode('utf-8', 'replace')!r}") from None
        raise JudgeError(f"judge endpoint {self.endpoint} is unreachable after {self.retries + 1} attempt(s): {last}")

    def grade(self, question: str, ground_truth: str, prediction: str) -> tuple[float | None, str]:
        """``(score in [0, 1] or None when no reply held one, the last reply)``.

        Greedy first; a reply without a score is asked again up to ``retries`` times at a rising
        temperature (as MM-Vet's grader does), since greedy would repeat the same reply.
        """
        reply = ""
        for attempt in range(self.retries + 1):
            reply = self.complete(grader_messages(question, ground_truth, prediction), temperature=min(0.2 * attempt, 1.0))
            score = parse_score(reply)
            if score is not None:
                return score, reply
        return None, reply
