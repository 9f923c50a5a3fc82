"""`python -m tests.job_agent URL`: waits (up to 120 s) until a Ray head's job agent answers.

`ray start` returns before the dashboard's job agent has registered; a `ray job submit` sent
then waits 10 s inside the head and fails with "No available agent to submit job" (seen on a
loaded machine). Asking the agent to stop a job that does not exist answers 404 once it is up.
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request

DEADLINE_S = 120.0


def agent_answers(url: str) -> bool:
    probe = urllib.request.Request(f"{url}/api/jobs/no-such-job/stop", method="POST")
    try:
        urllib.request.urlopen(probe, timeout=30)
    except urllib.error.HTTPError as exc:
        return exc.code == 404
    except OSError:
        return False
    return False


def main() -> int:
    url = sys.argv[1].rstrip("/")
    deadline = time.monotonic() + DEADLINE_S
    while not agent_answers(url):
        if time.monotonic() > deadline:
            print(f"the job agent of {url} did not answer within {DEADLINE_S:g} s", file=sys.stderr)
            return 1
        time.sleep(0.5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
