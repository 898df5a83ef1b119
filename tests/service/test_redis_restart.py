"""With AOF on, a Redis restart by SIGKILL loses no accepted request."""
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from hostile_api import STEPS, metrics, post, settings  # noqa: F401
from service_fixtures import (
    ApiServer,
    RedisServer,
    WorkerProc,
    reference,
    wait_for,
)

from stride_diffusion.service import images
from stride_diffusion.service.settings import Settings


# -- 8. with AOF, a Redis restart by SIGKILL loses no accepted request ----------------------------------
def test_aof_redis_killed_and_restarted_loses_no_accepted_request(tmp_path):
    rs = RedisServer(aof_dir=tmp_path)
    prefix = "aof"
    wp = WorkerProc(rs.url, "w-aof", prefix=prefix, delay_ms=30, extra=["--max-wait-ms", "0", "--max-batch", "2"])
    wp.wait_ready()
    api = ApiServer(Settings(role="api", redis_url=rs.url, key_prefix=prefix, test_model="gmm", steps=STEPS,
                             heartbeat_s=0.2))
    try:
        reqs = [{"class_label": k, "seed": 100 + k, "steps": 16} for k in range(6)]
        with ThreadPoolExecutor(len(reqs)) as ex:
            futs = [ex.submit(httpx.post, api.url + "/generate", json=p, timeout=60) for p in reqs]
            # accepted = in the stream (a batch of 2 rows runs; the rest wait): then Redis dies
            wait_for(lambda: rs.client().xlen(f"{prefix}:requests:gmm") == len(reqs), 20, "all accepted")
            rs.proc.send_signal(signal.SIGKILL)
            rs.proc.wait(10)
            time.sleep(0.3)
            rs.start()
            res = [f.result() for f in futs]
        assert [r.status_code for r in res] == [200] * len(reqs), [r.text for r in res]
        for p, r in zip(reqs, res):
            assert np.array_equal(images.decode(r.content), reference(p["class_label"], p["seed"], 16))
    finally:
        api.stop()
        wp.stop()
        rs.stop()

