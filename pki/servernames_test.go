package pki

import (
	"crypto/tls"
	"crypto/x509"
	"slices"
	"sync"
	"testing"
	"time"
)

// serveTLS runs a TLS listener on loopback with sc's certificate until the
// test ends, and returns its address.
func serveTLS(t *testing.T, sc *ServerCert) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", TLSServer(sc, tls.NoClientCert, nil))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.SetDeadline(time.Now().Add(10 * time.Second))
			c.(*tls.Conn).Handshake()
			c.Close()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return ln.Addr().String()
}

// TestServerCertRefreshNames: Refresh with names other than the
// certificate's re-issues it, the running listener serves the new one at
// the next handshake (a client verifying the new address succeeds, one
// verifying the old fails), and the certificate keeps its other
// properties. A Refresh that fails keeps the certificate and its names,
// and the next one retries.
func TestServerCertRefreshNames(t *testing.T) {
	ca, clk, _ := newCA(t)
	sc, err := ca.ServerCert("mqtt", []string{"bastion.local", "192.0.2.1"}, 48*time.Hour, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	old := sc.Leaf()
	addr := serveTLS(t, sc)
	verifies := func(name string) error {
		c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: ca.RootPool(), ServerName: name, Time: clk.Now})
		if err == nil {
			c.Close()
		}
		return err
	}
	if err := verifies("192.0.2.7"); err == nil {
		t.Fatal("before the refresh, the certificate is valid for 192.0.2.7, which it should not cover yet")
	}

	// A failure (no sane clock) changes nothing; the next pass retries.
	clk.mu.Lock()
	clk.bad = true
	clk.mu.Unlock()
	if issued, err := sc.Refresh([]string{"192.0.2.7", "bastion.local"}); err == nil || issued {
		t.Fatalf("Refresh without a sane clock: issued %v, %v; want an error", issued, err)
	}
	clk.mu.Lock()
	clk.bad = false
	clk.mu.Unlock()
	if Serial(sc.Leaf()) != Serial(old) {
		t.Fatal("a failed Refresh swapped the certificate")
	}
	if err := verifies("192.0.2.1"); err != nil {
		t.Fatalf("after a failed Refresh, the old address no longer verifies: %v", err)
	}

	if issued, err := sc.Refresh([]string{"192.0.2.7", "bastion.local"}); err != nil || !issued {
		t.Fatalf("Refresh with a new address: issued %v, %v; want re-issued", issued, err)
	}
	if err := verifies("192.0.2.7"); err != nil {
		t.Errorf("after the refresh, a client verifying 192.0.2.7: %v", err)
	}
	if err := verifies("bastion.local"); err != nil {
		t.Errorf("after the refresh, a client verifying bastion.local: %v", err)
	}
	if err := verifies("192.0.2.1"); err == nil {
		t.Error("after the refresh, the certificate still covers the address that went away (192.0.2.1)")
	}
	if issued, err := sc.Refresh([]string{"bastion.local", "192.0.2.7"}); err != nil || issued {
		t.Errorf("Refresh with the names it has: issued %v, %v; want nothing done", issued, err)
	}

	nw := sc.Leaf()
	if got := nw.Subject.CommonName; got != old.Subject.CommonName {
		t.Errorf("subject CN %q, want %q", got, old.Subject.CommonName)
	}
	if nw.KeyUsage != old.KeyUsage || !slices.Equal(nw.ExtKeyUsage, old.ExtKeyUsage) {
		t.Errorf("key usage %v %v, want %v %v", nw.KeyUsage, nw.ExtKeyUsage, old.KeyUsage, old.ExtKeyUsage)
	}
	if got, want := nw.NotAfter.Sub(nw.NotBefore), old.NotAfter.Sub(old.NotBefore); got != want {
		t.Errorf("validity %v, want %v", got, want)
	}
	if err := nw.CheckSignatureFrom(ca.Issuer()); err != nil {
		t.Errorf("not signed by the issuing CA: %v", err)
	}
	if _, err := nw.Verify(x509.VerifyOptions{Roots: ca.RootPool(), Intermediates: chainPool(ca), CurrentTime: clk.Now(),
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		t.Errorf("the new certificate does not verify as a server certificate: %v", err)
	}
	if n := len(sc.Certificate().Certificate); n != 2 {
		t.Errorf("chain served has %d certificates, want 2 (leaf and issuing CA)", n)
	}
	// A restart with the new names loads it rather than issuing another.
	again, err := ca.ServerCert("mqtt", []string{"bastion.local", "192.0.2.7"}, 48*time.Hour, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if Serial(again.Leaf()) != Serial(nw) {
		t.Error("a restart with the new names issued another certificate: the refreshed one was not stored")
	}
}

func chainPool(ca *CA) *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Issuer())
	return p
}

// Served names are compared as sets: a name given twice, or an IPv6
// address spelled another way, is no change.
func TestServerCertRefreshSameNames(t *testing.T) {
	ca, _, _ := newCA(t)
	sc, err := ca.ServerCert("coap", []string{"bastion.local", "2001:db8::1"}, 48*time.Hour, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if issued, err := sc.Refresh([]string{"2001:DB8:0::1", "bastion.local", "bastion.local"}); err != nil || issued {
		t.Errorf("Refresh with the same names spelled otherwise: issued %v, %v; want nothing done", issued, err)
	}
}
