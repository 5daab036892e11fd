"""Worker test app: takes 1.5 s to import (a stop signal arrives meanwhile)."""
import sys
import time

print("w_slowimport: importing", file=sys.stderr, flush=True)
time.sleep(1.5)


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"slow import done\n"]
