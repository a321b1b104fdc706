package firewall_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/bastion-iot/bastion/firewall"
)

// Turning the console off shows up in the plan as exactly its rule
// leaving, inside a new chain that replaces the old one.
func ExampleFirewall_Diff() {
	ctx := context.Background()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	fw, err := firewall.New(firewall.NewFake(firewall.IPv4), firewall.NewFake(firewall.IPv6), log, prometheus.NewRegistry())
	if err != nil {
		panic(err)
	}
	p := firewall.Policy{
		Zones: []firewall.Zone{{Name: "lan", Interfaces: []string{"eth1"}}, {Name: "wan", Interfaces: []string{"eth0"}}},
		Services: []firewall.Service{
			{Name: "mqtt-tls", Proto: firewall.TCP, Port: 8883, Zones: []string{"lan"}, Handshake: true},
			{Name: "console", Proto: firewall.TCP, Port: 443, Zones: []string{"lan"}},
		},
		HandshakeRate: firewall.Rate{Count: 20, Per: time.Second, Burst: 40},
	}
	if err := fw.Apply(ctx, p); err != nil {
		panic(err)
	}
	p.Services = p.Services[:1]
	plan, err := fw.Diff(ctx, p)
	if err != nil {
		panic(err)
	}
	fmt.Print(plan)
	// Output:
	// iptables:
	//   chain BASTION-IN-62426544 replaces BASTION-IN-0b26c0c5:
	//     - -i eth1 -p tcp -m tcp --dport 443 -m comment --comment bastion:svc:console -j ACCEPT
	//   + -I INPUT 1 -m comment --comment bastion:jump -j BASTION-IN-62426544
	//   - -A INPUT -m comment --comment bastion:jump -j BASTION-IN-0b26c0c5
	//   - chain BASTION-IN-0b26c0c5 (12 rules)
	// ip6tables:
	//   chain BASTION-IN-3262c5d0 replaces BASTION-IN-7161bf53:
	//     - -i eth1 -p tcp -m tcp --dport 443 -m comment --comment bastion:svc:console -j ACCEPT
	//   + -I INPUT 1 -m comment --comment bastion:jump -j BASTION-IN-3262c5d0
	//   - -A INPUT -m comment --comment bastion:jump -j BASTION-IN-7161bf53
	//   - chain BASTION-IN-7161bf53 (21 rules)
}
