// Command report reads go test -bench output of the side-by-side
// benchmarks on standard input and prints every goal's rounds, range,
// median and how often it was met (package benchgoals). scripts/bench runs
// it; it exits 1 on output it cannot read, never on a goal not met.
package main

import (
	"fmt"
	"os"

	"github.com/bastion-iot/bastion/internal/benchgoals"
)

func main() {
	res, err := benchgoals.Parse(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchgoals:", err)
		os.Exit(1)
	}
	if err := benchgoals.Write(os.Stdout, benchgoals.Judge(res, benchgoals.Goals)); err != nil {
		fmt.Fprintln(os.Stderr, "benchgoals:", err)
		os.Exit(1)
	}
}
