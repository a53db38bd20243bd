#!/usr/bin/env bash
# SuperNode authentication keys: an EC P-384 key pair in OpenSSH format per node.
#
#   bash deploy/generate-node-keys.sh DIR N         # DIR/node-0 ... DIR/node-<N-1>
#
# Each SuperNode keeps its private key (DIR/node-i, passed to flower-supernode with
# --auth-supernode-private-key); its public key (DIR/node-i.pub) is registered with
# `flwr supernode register`. Best made on the node's own machine, so the private key
# never travels. Existing keys are kept. Needs ssh-keygen (OpenSSH).
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: $0 DIR N" >&2
    exit 2
fi
mkdir -p "$1"
for ((i = 0; i < $2; i++)); do
    key="$1/node-$i"
    if [ -e "$key" ]; then
        echo "keeping existing $key"
    else
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "" -f "$key"
        echo "wrote $key and $key.pub"
    fi
done
