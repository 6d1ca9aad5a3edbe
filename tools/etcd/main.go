// Command etcd is etcd 3.7, built from the pinned go.etcd.io/etcd/server/v3
// release: the etcd binary the tests, benchmarks and the cluster example run
// (`make tools` installs it as bin/etcd). Debian's etcd-server is 3.4.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
