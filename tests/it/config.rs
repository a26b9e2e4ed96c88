use litefs::config::*;
#[test]
fn probe() {
    for t in ["fuse:\n  dir: /x\n  dri: y\nlease:\n  type: static\n",
              "lease:\n  type: static\n  consul:\n    url: x\n\n    kee: y\n",
              "lease: {type: static, consul: {kee: 1}}\n",
              "exec:\n  - cmd: a\n  - cmd: b\n    iff: c\n",
              "bogus: 1\n",
              "lease:\n  type: zookeeper\n",
              "data:\n  retention: 10x\n",
              "data:\n  retention: 10\n",
              "lease:\n  type: static\n  candidate: maybe\n",
              "fuse: [\n"] {
        let e = Config::parse(t, "t.yml", LoadOptions::default()).unwrap_err();
        println!("{e}\n  {e:?}");
    }
}
