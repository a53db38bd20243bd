#!/usr/bin/env bash
# TLS for a Flower SuperLink: a private CA and a server certificate it signs, valid for
# every HOST given (each IP address or DNS name that SuperNodes and `flwr` use to reach
# the SuperLink: it must be in the certificate's subjectAltName, or TLS fails).
#
#   bash deploy/generate-certificates.sh DIR HOST [HOST...]
#   e.g. bash deploy/generate-certificates.sh ~/rcsr-deploy/certificates 127.0.0.1 localhost
#
# Writes DIR/ca.crt (give it to every SuperNode and to whoever runs `flwr`), DIR/ca.key
# (keep it private: it signs certificates), DIR/server.pem and DIR/server.key (the
# SuperLink's). EC P-384 keys, valid 365 days. Needs OpenSSL >= 1.1.1.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 DIR HOST [HOST...]" >&2
    exit 2
fi
dir=$1
shift
san=""
for host in "$@"; do
    if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then san+="IP:$host,"; else san+="DNS:$host,"; fi
done
mkdir -p "$dir"
cd "$dir"
openssl ecparam -name secp384r1 -genkey -noout -out ca.key
openssl req -x509 -new -key ca.key -sha256 -days 365 -subj "/CN=rcsr-flower CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
    -out ca.crt
openssl ecparam -name secp384r1 -genkey -noout -out server.key
openssl req -new -key server.key -subj "/CN=$1" -out server.csr
printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n' \
    "${san%,}" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -sha256 \
    -extfile server.ext -out server.pem 2>/dev/null
chmod 600 ca.key server.key
rm -f server.csr server.ext ca.srl
echo "wrote $(pwd)/{ca.crt,ca.key,server.pem,server.key} for: $*"
