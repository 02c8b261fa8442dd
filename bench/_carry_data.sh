# Sourced by the GPU-machine scripts: DATA names the prepared Omniglot cache. The working tree
# that travels to the GPU machine is capped at 64 MiB and the package ships two 24 MB models, so
# the data may travel gzipped (.carry/omniglot.safetensors.gz, 6.7 MB): unpack it once per machine
# (the file is moved into place whole, so concurrent lanes never read half of it).
DATA=${DATA:-.carry/omniglot.safetensors}
if [ ! -f "$DATA" ] && [ -f "$DATA.gz" ]; then
  [ -f /tmp/omniglot.safetensors ] || { gunzip -c "$DATA.gz" > /tmp/omniglot.part.$$ && mv /tmp/omniglot.part.$$ /tmp/omniglot.safetensors; }
  DATA=/tmp/omniglot.safetensors
fi
