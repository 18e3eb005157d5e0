"""moto's standalone S3 server, with its conditional writes made atomic, as S3's are.

    python -m tests.s3_server -H 127.0.0.1 -p PORT      (from the repository root)

The registry allocates a version by creating its record with If-None-Match: * and takes the
next number when that fails (registry/store.py, _publish); S3 lets exactly one of several
concurrent creates of a key succeed. moto's server checks that the key is absent and then
writes it, on a thread per request, so under load two creates can both succeed: two pushes
then got the same version in test_concurrent_pushes_lose_no_version (seen once, on 2 busy
cores). Here a PUT of an object and a POST that completes a multipart upload (the two
requests that honour If-None-Match) run one at a time.
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
