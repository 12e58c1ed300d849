from xray_cls.train import main

if __name__ == "__main__":
    main()
