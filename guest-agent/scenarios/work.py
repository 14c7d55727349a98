"""Deterministic Python workload: import a good part of the stdlib, build a dict, fork a worker."""

import os
import sys

inst = int(sys.argv[1]) if len(sys.argv) > 1 else 0

import argparse  # noqa: E402,F401
import asyncio  # noqa: E402,F401
import collections  # noqa: E402
import csv  # noqa: E402,F401
import dataclasses  # noqa: E402,F401
import datetime  # noqa: E402,F401
import decimal  # noqa: E402
import email.message  # noqa: E402,F401
import fractions  # noqa: E402,F401
import hashlib  # noqa: E402
import http.client  # noqa: E402,F401
import json  # noqa: E402
import logging  # noqa: E402,F401
import pathlib  # noqa: E402,F401
import random  # noqa: E402
import re  # noqa: E402
import sqlite3  # noqa: E402,F401
import statistics  # noqa: E402,F401
import textwrap  # noqa: E402,F401
import unittest  # noqa: E402,F401
import urllib.parse  # noqa: E402,F401
import xml.etree.ElementTree as ET  # noqa: E402
import zipfile  # noqa: E402,F401

rng = random.Random(1234)
table = {f"key-{i}": (i * 7919) % 100003 for i in range(100_000)}
words = collections.Counter(rng.choice("abcdefgh") for _ in range(20_000))
doc = ET.fromstring("<r>" + "".join(f"<i n='{i}'/>" for i in range(500)) + "</r>")
blob = json.dumps({"n": len(table), "words": dict(words), "items": len(doc)}, sort_keys=True)
digest = hashlib.sha256(blob.encode()).hexdigest()
pat = re.compile(r"key-(\d+)7$")
hits = sum(1 for k in table if pat.match(k))

pid = os.fork()
if pid == 0:
    # worker: its own allocations on top of the shared (copy-on-write) parent heap
    d = decimal.Decimal(1) / decimal.Decimal(7)
    sq = [i * i for i in range(50_000)]
    os._exit(0 if sq[-1] > 0 and d > 0 else 1)
_, status = os.waitpid(pid, 0)
print(f"work inst={inst} dict={len(table)} hits={hits} sha={digest[:16]} worker={status}",
      flush=True)
sys.exit(0 if status == 0 else 1)
