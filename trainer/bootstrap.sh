#!/usr/bin/env bash
# spotrun instance bootstrap: fetched and run by the launch template's user data.
#
#   1. IMDSv2 token, instance id;
#   2. wait for s3://$SPOTRUN_BUCKET/tickets/<instance_id>.json (the attempt's ticket);
#   3. find the attached volumes, mkfs.ext4 an empty checkpoint volume, mount them
#      (data read-only) -- or, with SPOTRUN_VOLUME_ROOT set (the local cloud), link
#      the folders $SPOTRUN_VOLUME_ROOT/<volume_id> at $SPOTRUN_MOUNT_ROOT<mount_point>;
#   4. rewrite the ticket's mount points with the prefix;
#   5. start the trainer: `docker run` of the ticket's image (GPUs when present), or
#      with SPOTRUN_RUNNER=process `$SPOTRUN_PYTHON -m spotrun_trainer run --ticket F`.
#
# Any failure after the ticket has arrived is reported as Trainer.Failed with the
# ticket's task token; before that there is no token, so it is only logged. The
# trainer reports its own outcome; so does `spotrun_trainer run` when the command
# dies without reporting.
#
# Needs on the host: bash, curl, python3 with boto3 (JSON and AWS calls are done by
# the small Python helper below, so neither jq nor the aws CLI is needed), and
# docker (+ the NVIDIA container toolkit on GPU instances) for the docker runner.
# Environment: docs/contracts.md, "Bootstrap environment"; besides those,
# SPOTRUN_TICKET_POLL_SECONDS (2) sets how often S3 is asked for the ticket.
set -Eeuo pipefail

IMDS="${SPOTRUN_IMDS_ENDPOINT:-http://169.254.169.254}"
PY="${SPOTRUN_PYTHON:-python3}"
RUNNER="${SPOTRUN_RUNNER:-docker}"
MOUNT_ROOT="${SPOTRUN_MOUNT_ROOT:-/}"
MOUNT_ROOT="${MOUNT_ROOT%/}"  # "" for "/", so "$MOUNT_ROOT$mount_point" is right
TICKET_TIMEOUT="${SPOTRUN_TICKET_TIMEOUT_SECONDS:-600}"
TICKET_POLL="${SPOTRUN_TICKET_POLL_SECONDS:-2}"
STATE_DIR="$MOUNT_ROOT/var/lib/spotrun"
HELPER="$STATE_DIR/bootstrap_helper.py"
TICKET=""  # set once the ticket is on disk: from then on, failures are reported

log() { printf '%s spotrun-bootstrap: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }

report_failure() {
  if [[ -n "$TICKET" && -f "$TICKET" ]]; then
    "$PY" "$HELPER" report-failure "$TICKET" "$1" || log "could not report Trainer.Failed"
  else
    log "no ticket yet, so no task token: nothing to report to"
  fi
}

die() {
  trap - ERR
  log "FAILED: $1"
  report_failure "bootstrap: $1"
  exit 1
}

on_error() {
  local status=$? line=$1 command=$2
  trap - ERR
  log "FAILED (status $status) at line $line: $command"
  report_failure "bootstrap failed at line $line (status $status): $command"
  exit "$status"
}
trap 'on_error "$LINENO" "$BASH_COMMAND"' ERR

: "${SPOTRUN_BUCKET:?SPOTRUN_BUCKET is not set}"
: "${AWS_DEFAULT_REGION:?AWS_DEFAULT_REGION is not set}"
mkdir -p "$STATE_DIR"

# The helper: every JSON and AWS operation of the bootstrap, on python3 + boto3 only
# (the host does not need the spotrun_trainer package or the aws CLI).
cat >"$HELPER" <<'PYTHON'
import base64, json, os, random, sys, time

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

CLOSED = {"TaskTimedOut", "InvalidToken", "TaskDoesNotExist"}


def client(service):
    return boto3.client(service, config=Config(retries={"mode": "standard", "max_attempts": 5}))


def fetch_ticket(bucket, key, out, timeout, poll):
    s3 = client("s3")
    give_up = time.monotonic() + float(timeout)
    last = None
    while True:
        try:
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            json.loads(body)  # a half-written or broken ticket is an error now, not later
            with open(out + ".partial", "wb") as f:
                f.write(body)
            os.replace(out + ".partial", out)
            return 0
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code not in ("NoSuchKey", "404", "AccessDenied", "403"):
                raise
            # AccessDenied too: a fresh instance profile can take a moment to work.
            last = code
        except BotoCoreError as error:
            last = str(error)
        if time.monotonic() + float(poll) > give_up:
            print(f"no ticket s3://{bucket}/{key} after {timeout}s ({last})", file=sys.stderr)
            return 3
        time.sleep(float(poll))


def volumes(ticket):
    for v in json.load(open(ticket))["volumes"]:
        fields = [v["role"], v["volume_id"], v["device"], v["mount_point"],
                  str(bool(v.get("format_if_empty"))).lower(), str(bool(v.get("read_only"))).lower()]
        if any(not f or "\t" in f or "\n" in f for f in fields):
            raise SystemExit(f"bad volume entry in the ticket: {v!r}")
        print("\t".join(fields))
    return 0


def prefix(ticket, out, root):
    data = json.load(open(ticket))
    root = root.rstrip("/")
    for v in data["volumes"]:
        v["mount_point"] = root + v["mount_point"]
    data["checkpoint"]["dir"] = root + data["checkpoint"]["dir"]
    if isinstance(data.get("dataset"), dict) and data["dataset"].get("mount_point"):
        data["dataset"]["mount_point"] = root + data["dataset"]["mount_point"]
    with open(out + ".partial", "w") as f:
        json.dump(data, f, indent=2)
    os.replace(out + ".partial", out)
    return 0


def attached(volume_id, instance_id):
    # Folder mode stands in for a block device; EC2 must still say it is attached here,
    # as a real device would only appear if it were.
    (volume,) = client("ec2").describe_volumes(VolumeIds=[volume_id])["Volumes"]
    here = [a for a in volume.get("Attachments", []) if a.get("InstanceId") == instance_id]
    if not here or here[0].get("State") not in ("attaching", "attached"):
        elsewhere = [a.get("InstanceId") for a in volume.get("Attachments", [])]
        print(f"{volume_id} is not attached to {instance_id} (attachments: {elsewhere})",
              file=sys.stderr)
        return 1
    return 0


def field(ticket, name):
    value = json.load(open(ticket)).get(name)
    print(value if isinstance(value, str) else json.dumps(value))
    return 0


def ecr_password(region):
    token = client("ecr").get_authorization_token()["authorizationData"][0]
    print(base64.b64decode(token["authorizationToken"]).decode().split(":", 1)[1])
    return 0


def report_failure(ticket, error):
    data = json.load(open(ticket))
    token = data.get("task_token")
    if not token:
        print("the ticket has no task token", file=sys.stderr)
        return 1
    sfn = client("stepfunctions")
    cause = json.dumps({"error": error[:30000], "checkpoint_step": None})
    for attempt in range(8):
        try:
            sfn.send_task_failure(taskToken=token, error="Trainer.Failed", cause=cause)
            print("reported Trainer.Failed", file=sys.stderr)
            return 0
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in CLOSED:
                print(f"task already closed ({code})", file=sys.stderr)
                return 0
            failure = e
        except BotoCoreError as e:
            failure = e
        time.sleep(min(10.0, 0.5 * 2**attempt) * random.uniform(0.5, 1.0))
    print(f"could not report: {failure}", file=sys.stderr)
    return 1


commands = {"fetch-ticket": fetch_ticket, "volumes": volumes, "prefix": prefix,
            "field": field, "ecr-password": ecr_password, "report-failure": report_failure,
            "attached": attached}
sys.exit(commands[sys.argv[1]](*sys.argv[2:]))
PYTHON

# -- 1. who am I -------------------------------------------------------------------
imds_token="$(curl -fsS --retry 10 --retry-connrefused --retry-delay 1 -X PUT \
  -H 'X-aws-ec2-metadata-token-ttl-seconds: 21600' "$IMDS/latest/api/token")"
instance_id="$(curl -fsS --retry 10 --retry-connrefused --retry-delay 1 \
  -H "X-aws-ec2-metadata-token: $imds_token" "$IMDS/latest/meta-data/instance-id")"
log "instance $instance_id, waiting for its ticket (up to ${TICKET_TIMEOUT}s)"

# -- 2. the ticket -----------------------------------------------------------------
fetched="$STATE_DIR/ticket.original.json"
status=0
"$PY" "$HELPER" fetch-ticket "$SPOTRUN_BUCKET" "tickets/$instance_id.json" "$fetched" \
  "$TICKET_TIMEOUT" "$TICKET_POLL" || status=$?
if (( status != 0 )); then
  die "no ticket for $instance_id (status $status)"
fi
TICKET="$fetched"
log "ticket for job $("$PY" "$HELPER" field "$TICKET" job_id)," \
  "attempt $("$PY" "$HELPER" field "$TICKET" attempt)"

# -- 3. volumes --------------------------------------------------------------------
find_device() {  # <volume_id> <device>: the block device of an attached EBS volume
  local serial="${1//-/}" device="$2" waited=0 candidate
  # Nitro instances expose EBS as NVMe, named by volume id (without the dash);
  # older ones use the requested device name, or its xvd alias.
  while (( waited < 120 )); do
    for candidate in "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_$serial" \
      "$device" "${device/\/dev\/sd//dev/xvd}"; do
      if [[ -b "$candidate" ]]; then
        readlink -f "$candidate"
        return 0
      fi
    done
    sleep 2
    waited=$((waited + 2))
  done
  return 1
}

mount_volume() {  # <role> <volume_id> <device> <mount_point> <format_if_empty> <read_only>
  local role="$1" volume_id="$2" device="$3" target="$MOUNT_ROOT$4" format="$5" ro="$6"
  local real options
  real="$(find_device "$volume_id" "$device")" ||
    die "$role volume $volume_id is not attached (no NVMe id, no $device)"
  if [[ "$format" == true ]]; then
    # blkid -p exits 2 only when it found no signature at all; any other failure
    # (ambiguous probe, I/O error) must not be taken for "empty" and wipe a checkpoint.
    local probe=0
    blkid -p "$real" >/dev/null 2>&1 || probe=$?
    if (( probe == 2 )); then
      log "formatting empty $role volume $volume_id ($real) as ext4"
      mkfs.ext4 -q -L "spotrun-$role" "$real"
    elif (( probe != 0 )); then
      die "cannot tell whether $role volume $volume_id ($real) is empty (blkid -p status $probe)"
    fi
  fi
  mkdir -p "$target"
  if mountpoint -q "$target"; then
    log "$target is already mounted"
    return 0
  fi
  options="rw,noatime"
  [[ "$ro" == true ]] && options="ro,noatime"
  mount -o "$options" "$real" "$target"
  log "mounted $role volume $volume_id ($real) at $target ($options)"
}

link_volume() {  # folder mode: the local cloud's volumes are folders
  local role="$1" volume_id="$2" target="$MOUNT_ROOT$4"
  local source="$SPOTRUN_VOLUME_ROOT/$volume_id"
  [[ -d "$source" ]] || die "$role volume $volume_id is not attached (no folder $source)"
  "$PY" "$HELPER" attached "$volume_id" "$instance_id" ||
    die "$role volume $volume_id is not attached to $instance_id"
  mkdir -p "$(dirname "$target")"
  if [[ -L "$target" ]]; then
    rm "$target"
  elif [[ -d "$target" ]]; then
    rmdir "$target" || die "$target exists and is not empty"
  fi
  ln -s "$source" "$target"
  log "linked $role volume $volume_id at $target"
}

volume_list="$STATE_DIR/volumes.tsv"
"$PY" "$HELPER" volumes "$TICKET" >"$volume_list"
bind_args=()
while IFS=$'\t' read -r role volume_id device mount_point format ro; do
  if [[ -n "${SPOTRUN_VOLUME_ROOT:-}" ]]; then
    link_volume "$role" "$volume_id" "$device" "$mount_point" "$format" "$ro"
  else
    mount_volume "$role" "$volume_id" "$device" "$mount_point" "$format" "$ro"
  fi
  suffix=""
  [[ "$ro" == true ]] && suffix=":ro"
  bind_args+=(-v "$MOUNT_ROOT$mount_point:$MOUNT_ROOT$mount_point$suffix")
done <"$volume_list"

# -- 4. the ticket the trainer sees ------------------------------------------------
run_ticket="$STATE_DIR/ticket.json"
"$PY" "$HELPER" prefix "$TICKET" "$run_ticket" "$MOUNT_ROOT"

# -- 5. the trainer ----------------------------------------------------------------
case "$RUNNER" in
  process)
    "$PY" -c 'import spotrun_trainer' 2>/dev/null ||
      die "$PY cannot import spotrun_trainer (set PYTHONPATH or install the package)"
    export SPOTRUN_TICKET="$run_ticket"
    log "starting the trainer as a process"
    trap - ERR
    # exec: signals for the instance reach the runner, which forwards them and
    # reports for a command that dies silently.
    exec "$PY" -m spotrun_trainer run --ticket "$run_ticket"
    ;;
  docker)
    image="$("$PY" "$HELPER" field "$TICKET" image)"
    [[ -n "$image" && "$image" != null ]] || die "the ticket names no image"
    region="$("$PY" "$HELPER" field "$TICKET" region)"
    if [[ "$image" == *.dkr.ecr.*.amazonaws.com/* ]]; then
      AWS_DEFAULT_REGION="$region" "$PY" "$HELPER" ecr-password "$region" |
        docker login --username AWS --password-stdin "${image%%/*}" >/dev/null
    fi
    for attempt in 1 2 3; do
      docker pull --quiet "$image" >/dev/null && break
      (( attempt == 3 )) && die "cannot pull $image"
      sleep $((attempt * 5))
    done
    gpu_args=()
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      gpu_args=(--gpus all)
    fi
    env_args=(-e "SPOTRUN_TICKET=/etc/spotrun/ticket.json" -e "AWS_DEFAULT_REGION=$region"
      -e "SPOTRUN_IMDS_ENDPOINT=$IMDS")
    [[ -n "${AWS_ENDPOINT_URL:-}" ]] && env_args+=(-e "AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL")
    [[ -n "${SPOTRUN_NOTICE_POLL_SECONDS:-}" ]] &&
      env_args+=(-e "SPOTRUN_NOTICE_POLL_SECONDS=$SPOTRUN_NOTICE_POLL_SECONDS")
    log "starting $image ${gpu_args[*]}"
    status=0
    # Host network: IMDS at 169.254.169.254 stays one hop away (hop limit 1).
    # --stop-timeout: the trainer gets the whole spot warning to save on SIGTERM.
    docker run --rm --network host --ipc host --stop-timeout 110 \
      --name "spotrun-$instance_id" "${gpu_args[@]}" "${bind_args[@]}" "${env_args[@]}" \
      -v "$run_ticket:/etc/spotrun/ticket.json:ro" \
      "$image" --ticket /etc/spotrun/ticket.json || status=$?
    if (( status >= 125 && status <= 127 )); then
      # docker itself failed (not the trainer, which reports for itself)
      die "docker could not run $image (status $status)"
    fi
    log "trainer container exited with status $status"
    exit "$status"
    ;;
  *)
    die "unknown SPOTRUN_RUNNER '$RUNNER' (docker or process)"
    ;;
esac
