"""moto's standalone S3 server, with its conditional writes made atomic, as S3's are: the
local fleet's shared registry (fleet.py) and the tests' S3 (tests/conftest.py).

    python deploy/local/s3_server.py -H 127.0.0.1 -p PORT

The registry allocates a version by creating its record with If-None-Match: * and takes the
next number when that fails (registry/store.py, _publish); S3 lets exactly one of several
concurrent creates of a key succeed. moto's server checks that the key is absent and then
writes it, on a thread per request, so under load two creates can both succeed, and two
pushes (two replicas training at once, or test_concurrent_pushes_lose_no_version) get the
same version: plain moto let two or more of 12 concurrent creates win in 3 of 400 races on
2 busy cores, this server in none. Here a PUT of an object and a POST that completes a
multipart upload (the two requests that honour If-None-Match) run one at a time.
"""

from __future__ import annotations

import functools
import sys
import threading

from moto.s3.responses import S3Response
from moto.server import main

_writes = threading.Lock()


def _one_at_a_time(method):
    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        with _writes:
            return method(*args, **kwargs)

    return wrapped


S3Response.put_object = _one_at_a_time(S3Response.put_object)
S3Response._key_response_post = _one_at_a_time(S3Response._key_response_post)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
