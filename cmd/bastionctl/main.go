// Command bastionctl administers a running bastiond over its root-only
// local control socket.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/bastion-iot/bastion/gateway/control"
)

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

const usage = `usage: bastionctl [--state DIR | --socket PATH] [--json] COMMAND

commands:
  status                                  gateway health and listeners
  device list                             every device
  device add NAME --auth psk              pre-provision a PSK device
  device add NAME --auth cert --csr FILE  issue a certificate for a device's CSR
  device add NAME --auth secret           MQTT device with id + secret login
  device revoke ID                        revoke a device at once
  pki show                                CA and server certificates
  firewall plan                           what applying the policy would change
  firewall show                           the live rules and drop counters
  firewall remove                         take Bastion's rules out (the only way)
  firmware status                         firmware cache, offers, device update status
  firmware check                          check the vendor's TUF repository now
  pairing expect NAME --code CODE         register a device's setup code for the next pairing window
                                          (only the box's button opens the window)
  upstream parked [list]                  messages the cloud broker refused for good, held on the box
  upstream parked retry                   send them again (after fixing the cause on the broker)
  upstream parked drop                    delete them (they are gone)
  console recover                         one-time code to reset a console password (physical access to the box)
  metrics                                 Prometheus metrics
`

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("bastionctl", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage) }
	state := fs.String("state", defaultState(), "state directory of the bastiond to talk to")
	socket := fs.String("socket", "", "control socket path (default STATE/"+control.SocketName+")")
	asJSON := fs.Bool("json", false, "print JSON for scripts")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	path := *socket
	if path == "" {
		path = control.SocketPath(*state)
	}
	c := &cli{ctl: control.New(path), json: *asJSON, out: stdout}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.dispatch(ctx, fs.Args()); err != nil {
		fmt.Fprintln(stderr, "bastionctl:", err)
		if _, ok := err.(usageError); ok {
			fmt.Fprint(stderr, usage)
			return 2
		}
		return 1
	}
	return 0
}

// defaultState matches bastiond: the production state directory when it
// exists, else the --dev default.
func defaultState() string {
	if _, err := os.Stat("/var/lib/bastion/" + control.SocketName); err == nil {
		return "/var/lib/bastion"
	}
	return "bastion-dev"
}
