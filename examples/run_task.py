"""Runs one command as a task on a Butte cluster and prints how it ended.

    .venv/bin/python examples/run_task.py [--master http://127.0.0.1:5050] [--cpus 0.5] [--mem 128] -- COMMAND...

A tiny Mesos framework (mesoshttp, the same client the tests use): it takes
the first offer that fits, launches the command, prints each state, and
tears itself down when the task ends. Ctrl-C kills the task.
"""

import argparse
import queue
import sys
import threading
import uuid

from mesoshttp.client import MesosClient


def main():
    parser = argparse.ArgumentParser(description="Run one command on a Butte cluster")
    parser.add_argument("--master", default="http://127.0.0.1:5050")
    parser.add_argument("--cpus", type=float, default=0.5)
    parser.add_argument("--mem", type=float, default=128)
    parser.add_argument("--principal", help="authenticate as this principal (HTTP Basic)")
    parser.add_argument("--secret", help="the principal's secret")
    parser.add_argument("--ca", help="the CA that signed the master's certificate (https)")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args()

    events = queue.Queue()
    client = MesosClient(mesos_urls=[args.master], frameworkName="butte-run", max_reconnect=1)
    if args.principal:
        import requests.auth
        client.principal = args.principal
        client.requests_auth = requests.auth.HTTPBasicAuth(args.principal, args.secret or "")
    if args.ca:
        client.verify = args.ca
    for kind in (MesosClient.SUBSCRIBED, MesosClient.OFFERS, MesosClient.UPDATE, MesosClient.ERROR):
        client.on(kind, lambda payload, kind=kind: events.put((kind, payload)))
    threading.Thread(target=client.register, daemon=True).start()

    task_id = "run-" + uuid.uuid4().hex[:8]
    driver, agent_id, launched = None, None, False
    try:
        while True:
            try:
                kind, payload = events.get(timeout=60)
            except queue.Empty:
                print("no answer from %s within 60 s; is the cluster running (scripts/cluster)?" % args.master)
                return 2
            if kind == MesosClient.ERROR:
                print("master error: %s" % payload)
                return 2
            if kind == MesosClient.SUBSCRIBED:
                driver = payload
            elif kind == MesosClient.OFFERS:
                for offer in payload:
                    info = offer.get_offer()
                    cpus = sum(r["scalar"]["value"] for r in info["resources"] if r["name"] == "cpus")
                    mem = sum(r["scalar"]["value"] for r in info["resources"] if r["name"] == "mem")
                    if launched or cpus < args.cpus or mem < args.mem:
                        offer.decline()
                        continue
                    agent_id = info["agent_id"]
                    offer.accept([{
                        "name": task_id,
                        "task_id": {"value": task_id},
                        "agent_id": agent_id,
                        "resources": [
                            {"name": "cpus", "type": "SCALAR", "scalar": {"value": args.cpus}},
                            {"name": "mem", "type": "SCALAR", "scalar": {"value": args.mem}},
                        ],
                        "command": {"value": " ".join(args.command)},
                    }])
                    launched = True
                    print("launched %s on agent %s" % (task_id, agent_id["value"]))
            elif kind == MesosClient.UPDATE:
                status = payload["status"]
                if status["task_id"]["value"] != task_id:
                    continue
                print("%s %s" % (status["state"], status.get("message", "")))
                if status["state"] not in ("TASK_STAGING", "TASK_STARTING", "TASK_RUNNING", "TASK_KILLING"):
                    return 0 if status["state"] == "TASK_FINISHED" else 1
    except KeyboardInterrupt:
        if driver and agent_id:
            driver.kill(agent_id["value"], task_id)
        return 130
    finally:
        if driver:
            driver.tearDown()
        client.stop = True
        client.disconnect_framework()


if __name__ == "__main__":
    sys.exit(main())
