// Package firewall compiles the gateway's declarative network policy into
// iptables and ip6tables rules and keeps the kernel in step with it.
//
// It owns Bastion's chains in the filter table (named BASTION-IN-<hash> and
// BASTION-FWD-<hash>, each reached by a single jump at the top of INPUT and
// FORWARD) and nothing else: it never changes chain policies, other tables,
// or rules it did not write, except for removing extra jumps into its own
// chains. Changes are planned as plain data, diffed against what the kernel
// has and committed as one iptables-restore transaction per address family,
// so a reload never opens a port that neither the old nor the new policy
// allows; a family already committed when the other fails is rolled back
// before Apply returns. Stopping leaves the rules in place (fail closed);
// only Remove takes them out.
//
// The kernel is reached through the Backend interface: NewIPTables is the
// real one (github.com/coreos/go-iptables plus iptables-restore), Fake is an
// in-memory one for tests that cannot be root.
package firewall
