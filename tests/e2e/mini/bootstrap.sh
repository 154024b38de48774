#!/bin/bash
# A stand-in bootstrap for the machinery tests: reads IMDS like the real one, then
# prints trainer-style JSON lines until the spot notice appears or it is killed.
set -u
imds="$SPOTRUN_IMDS_ENDPOINT"
token=$(curl -sf -X PUT "$imds/latest/api/token" -H "X-aws-ec2-metadata-token-ttl-seconds: 300")
get() { curl -sf -H "X-aws-ec2-metadata-token: $token" "$imds/latest/meta-data/$1"; }
id=$(get instance-id)
echo "{\"event\":\"start\",\"step\":0,\"resumed_from\":null,\"instance\":\"$id\",\"zone\":\"$(get placement/availability-zone)\"}"
trap 'echo "{\"event\":\"sigterm\"}"; exit 0' TERM
step=0
while [ $step -lt 100000 ]; do
  step=$((step + 1))
  echo "{\"event\":\"step\",\"step\":$step,\"loss\":1.0}"
  if notice=$(get spot/instance-action); then
    echo "{\"event\":\"notice\",\"kind\":\"instance-action\",\"detail\":$notice}"
    echo "{\"event\":\"checkpoint\",\"step\":$step,\"durable\":true}"
    break
  fi
  sleep 0.1
done
sleep 1000 & wait
