# workerd peer for the Colony benchmark: one SQLite-backed Durable Object class
# served over HTTP.
#
# Neither the listen address nor the storage directory is set here; both must be
# given on the command line (workerd refuses to start otherwise):
#
#   workerd serve config.capnp \
#     --socket-addr http=127.0.0.1:PORT \
#     --directory-path do-storage=/abs/path/to/empty/dir
#
# The data for each object lands in <dir>/counter/<object-id>.sqlite.

using Workerd = import "/workerd/workerd.capnp";

const config :Workerd.Config = (
  services = [
    (name = "main", worker = .mainWorker),
    (name = "do-storage", disk = (writable = true)),
  ],
  sockets = [
    (name = "http", http = (), service = "main"),
  ],
);

const mainWorker :Workerd.Worker = (
  modules = [
    (name = "worker.js", esModule = embed "worker.js"),
  ],
  compatibilityDate = "2025-01-01",
  bindings = [
    (name = "NS", durableObjectNamespace = "Counter"),
  ],
  durableObjectNamespaces = [
    (className = "Counter", uniqueKey = "counter", enableSql = true),
  ],
  durableObjectStorage = (localDisk = "do-storage"),
);
